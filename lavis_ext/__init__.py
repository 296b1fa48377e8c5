"""lavis-ext: BLIP-2 on a current stack, as a plug-in for Salesforce LAVIS 1.0.2.

``import lavis_ext`` does nothing else: no shim, no LAVIS, no torch, so ``lavis_ext.evaluation`` (the metrics)
and ``lavis_ext.serve.batching`` import without the training stack. :func:`register` (idempotent; the entry
points call it: ``train.py``, ``evaluate.py``, the ``lavis-ext`` command, ``lavis_ext.inference.load``, the
tests) applies the compatibility shims (:mod:`lavis_ext.compat`, the one place that patches other packages)
and registers our models, dataset builders, tasks and runners in LAVIS's registry. Importing one of those
subpackages directly applies the shims first (LAVIS cannot be imported without them) and registers its
own classes, as any registry decorator does.
"""
__version__ = "0.1.0"

_registered = False


def register() -> None:
    """Apply the LAVIS shims and register every lavis-ext model, builder, task and runner (once)."""
    global _registered
    if _registered:
        return
    from lavis_ext import compat

    compat.apply()
    from lavis_ext import datasets, models, runners, tasks  # noqa: F401  (registration by import)

    runners.bind_lavis_runner_names()  # `runner: runner_base` in a project means RunnerBaseExt
    _registered = True

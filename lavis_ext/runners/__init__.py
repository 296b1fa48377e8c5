"""Registers RunnerBaseExt and RunnerIterExt (as ``runner_base_ext`` / ``runner_iter_ext``);
:func:`bind_lavis_runner_names` makes LAVIS's own names mean them."""
from lavis_ext import compat as _compat

_compat.apply()  # LAVIS cannot be imported before its shims

from lavis.common.registry import registry  # noqa: E402
from lavis.runners.runner_base import RunnerBase  # noqa: E402
from lavis.runners.runner_iter import RunnerIter  # noqa: E402

from lavis_ext.runners.runner_base import RunnerBaseExt  # noqa: E402
from lavis_ext.runners.runner_iter import RunnerIterExt  # noqa: E402

__all__ = ["RunnerBaseExt", "RunnerIterExt", "bind_lavis_runner_names"]


def bind_lavis_runner_names() -> None:
    """Projects say ``runner: runner_base`` / ``runner_iter`` (LAVIS's names); from this call on they mean our
    runners, and LAVIS's classes stay reachable as ``runner_base_lavis`` / ``runner_iter_lavis``.

    Why rebinding a registry entry and not a new name: every LAVIS project file and recipe in the wild names
    ``runner_base``; ``registry.register_runner`` refuses a taken name, so the mapping entry is replaced. Called
    once by :func:`lavis_ext.register`, not on import, so importing this package changes no LAVIS name.
    """
    runners = registry.mapping["runner_name_mapping"]
    for name, ours, theirs in (("runner_base", RunnerBaseExt, RunnerBase), ("runner_iter", RunnerIterExt, RunnerIter)):
        runners[f"{name}_lavis"] = theirs
        runners[name] = ours

"""lavis-ext: BLIP-2 on a current stack, as a plug-in for Salesforce LAVIS 1.0.2.

`import lavis_ext` applies the compatibility shims, imports LAVIS, and registers our models,
dataset builders, processors, tasks and the `runner_base` runner. It imports nothing optional
(no serving, export or video code), so it stays cheap.
"""
from lavis_ext import compat as _compat

_compat.apply()

from lavis_ext import datasets as _datasets  # noqa: E402,F401  (registers builders)
from lavis_ext import models as _models  # noqa: E402,F401  (registers models)
from lavis_ext import runners as _runners  # noqa: E402,F401  (binds runner_base to our runner)
from lavis_ext import tasks as _tasks  # noqa: E402,F401  (registers tasks)

__version__ = "0.1.0"

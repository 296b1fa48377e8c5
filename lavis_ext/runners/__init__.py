"""Registers RunnerBaseExt and RunnerIterExt and binds the names `runner_base` / `runner_iter` to them."""
from lavis_ext import compat as _compat

_compat.apply()  # LAVIS cannot be imported before its shims

from lavis_ext.runners.runner_base import RunnerBaseExt
from lavis_ext.runners.runner_iter import RunnerIterExt

__all__ = ["RunnerBaseExt", "RunnerIterExt"]

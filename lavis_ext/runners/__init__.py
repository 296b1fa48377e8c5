"""Registers RunnerBaseExt and binds the name `runner_base` to it."""
from lavis_ext.runners.runner_base import RunnerBaseExt

__all__ = ["RunnerBaseExt"]

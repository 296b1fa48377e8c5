"""Registers the tasks: captioning_ext, vqa_ext."""
from lavis_ext.tasks.captioning import CaptionTaskExt
from lavis_ext.tasks.vqa import VQATaskExt

__all__ = ["CaptionTaskExt", "VQATaskExt"]

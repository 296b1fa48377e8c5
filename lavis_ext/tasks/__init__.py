"""Registers the tasks: captioning_ext, vqa_ext, gqa_ext, image_text_pretrain_ext, retrieval_ext."""
from lavis_ext import compat as _compat

_compat.apply()  # LAVIS cannot be imported before its shims

from lavis_ext.tasks.captioning import CaptionTaskExt
from lavis_ext.tasks.gqa import GQATaskExt
from lavis_ext.tasks.pretrain import PretrainTaskExt
from lavis_ext.tasks.retrieval import RetrievalTaskExt
from lavis_ext.tasks.vqa import VQATaskExt

__all__ = ["CaptionTaskExt", "GQATaskExt", "PretrainTaskExt", "RetrievalTaskExt", "VQATaskExt"]

"""Datasets: the webdataset pipeline and builders, annotation-file builders, the synthetic world.

Importing this package registers the builders with LAVIS (``wds_caption``, ``wds_vqa``, ``json_caption``,
``json_vqa``, ``coco_caption_file``) and nothing else; the synthetic generator and the shard converter
are imported only where used.
"""
from lavis_ext import compat as _compat

_compat.apply()  # LAVIS cannot be imported before its shims

from lavis_ext.datasets import annotations, builders  # noqa: F401  (registration)
from lavis_ext.datasets import official  # noqa: F401  (registration: vqa_files, gqa_files)

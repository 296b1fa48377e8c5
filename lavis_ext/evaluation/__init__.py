"""Evaluation metrics that work without the training stack (no torch, no LAVIS imports here).

Kept cheap to import: only the standard library at module level; pycocoevalcap is imported inside the functions.
"""
from lavis_ext.evaluation.caption_metrics import best_constant_caption, evaluate_captions

__all__ = ["best_constant_caption", "evaluate_captions"]

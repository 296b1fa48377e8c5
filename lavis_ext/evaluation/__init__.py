"""Evaluation metrics that work without the training stack (no torch imports here).

- :func:`evaluate_captions`: pycocoevalcap's pipeline (PTB tokenisation, BLEU-1..4, METEOR, ROUGE-L, CIDEr-D,
  SPICE when its jars are present) on ``{id: caption}`` / ``{id: [refs]}`` dicts, faster than ``COCOEvalCap``
  with the same scores; :func:`best_constant_caption`.
- :func:`vqa_accuracy`: the official VQA accuracy (LAVIS's port of the official code, checked against it);
  ``mode="simplified"`` only by name. :func:`gqa_accuracy`: GQA exact match. :func:`normalize_answer`.
- :func:`write_vqa_submission` (EvalAI) and :func:`write_gqa_submission`.
- :mod:`lavis_ext.evaluation.files` reads COCO / VQAv2 / GQA / our annotation and result files;
  ``python -m lavis_ext.evaluation.score`` (or ``lavis-ext score``) scores a result file against one.

Kept cheap to import: only the standard library at module level; pycocoevalcap and LAVIS's ``vqa_eval`` are
imported inside the functions.
"""
from lavis_ext.evaluation.caption_metrics import (
    best_constant_caption,
    evaluate_captions,
)
from lavis_ext.evaluation.vqa import (
    gqa_accuracy,
    normalize_answer,
    vqa_accuracy,
    write_gqa_submission,
    write_vqa_submission,
)

__all__ = [
    "best_constant_caption",
    "evaluate_captions",
    "gqa_accuracy",
    "normalize_answer",
    "vqa_accuracy",
    "write_gqa_submission",
    "write_vqa_submission",
]

"""VQA targets with several weighted answers per question, shared by the OPT and Flan-T5 models.

LAVIS's BLIP-2 trains on one target string per sample. VQA ground truth has up to ten annotator
answers; as BLIP's VQA fine-tuning does, every distinct answer becomes a target sequence and its loss
counts with the answer's share of the votes (``samples["weights"]``), so "2" said by 7 of 10
annotators pulls seven times harder than "3" said by one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def expand_answers(samples: dict) -> tuple[list[str], torch.Tensor | None, list[int]]:
    """(targets, weights or None, index of each target's question).

    Batches with ``answers`` and ``weights`` give one target per distinct answer; otherwise one
    target per question (``text_output``) and no weights.
    """
    answers, weights = samples.get("answers"), samples.get("weights")
    if answers is None or weights is None:
        targets = list(samples["text_output"])
        return targets, None, list(range(len(targets)))
    targets, flat_weights, index = [], [], []
    for i, (answer_list, weight_list) in enumerate(zip(answers, weights)):
        if len(answer_list) != len(weight_list):
            raise ValueError(f"question {i}: {len(answer_list)} answers but {len(weight_list)} weights")
        targets.extend(answer_list)
        flat_weights.extend(float(w) for w in weight_list)
        index.extend([i] * len(answer_list))
    return targets, torch.tensor(flat_weights), index


def weighted_sequence_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, num_questions: int):
    """Sum over targets of weight x (mean token cross-entropy of the target), averaged per question.

    ``logits[j, t]`` predicts ``labels[j, t]`` (already aligned); positions labelled -100 are ignored.
    """
    token_loss = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="none"
    ).view(labels.shape)
    counted = (labels != -100).sum(dim=1).clamp(min=1)
    per_target = token_loss.sum(dim=1) / counted
    return (per_target * weights.to(per_target.device)).sum() / num_questions

"""Image-text retrieval recall (R@1/5/10, image-to-text and text-to-image) over a score matrix.

Pure functions on numbers: the retrieval task (:mod:`lavis_ext.tasks.retrieval`) builds the score
matrices, this module only ranks. Conventions are LAVIS's (``txt_r*`` = image-to-text, ``img_r*`` =
text-to-image, in percent; an image is retrieved correctly when *any* of its captions is in the top K).

Ties are counted pessimistically: the rank of the ground truth is the number of *wrong* candidates
that score at least as high as the best ground-truth candidate. Why: LAVIS sorts with
``np.argsort`` (quicksort, not stable), so on ties its recall depends on array order. A constant (or
collapsed) scorer would then "retrieve" whatever happens to sit first, and a split whose captions are
stored image by image would look well above chance. Counting ties against the model gives a number
that depends only on the scores, never on the order of the arrays (so it is also the same on 1 or N
processes), and a scorer that cannot tell two candidates apart gets no credit for either. Other
ground-truth captions of the same image never count against it. Scores of ``-inf`` (candidates the
re-ranking stage never looked at) tie with each other and therefore rank after every finite score.

Duplicate captions (two images with the identical sentence) are separate texts with their own ground
truth, as in LAVIS: a text belongs to the image it was written for. A text whose ground truth is
several images may be given as a list in ``txt2img``.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

__all__ = ["index_captions", "ground_truth_ranks", "recall_at_k", "retrieval_metrics"]

DEFAULT_KS = (1, 5, 10)


def index_captions(captions_per_image: Sequence[Sequence[str]]) -> tuple[list[str], list[list[int]], list[int]]:
    """Flatten per-image caption lists into LAVIS's ``text``, ``img2txt`` and ``txt2img``.

    Args:
        captions_per_image: for each image (in order), its captions.

    Returns:
        ``(texts, img2txt, txt2img)``: all captions in order, the text indices of each image, the image
        index of each text.

    Raises:
        ValueError: an image without captions (it could never be retrieved correctly).
    """
    texts: list[str] = []
    img2txt: list[list[int]] = []
    txt2img: list[int] = []
    for image_index, captions in enumerate(captions_per_image):
        if not captions:
            raise ValueError(f"image {image_index} has no captions; every retrieval image needs at least one")
        img2txt.append(list(range(len(texts), len(texts) + len(captions))))
        texts.extend(str(c) for c in captions)
        txt2img.extend([image_index] * len(captions))
    return texts, img2txt, txt2img


def _positives(ground_truth, rows: int, cols: int, what: str) -> list[list[int]]:
    if len(ground_truth) != rows:
        raise ValueError(f"{what} has {len(ground_truth)} entries for a score matrix with {rows} rows")
    result = []
    for row, entry in enumerate(ground_truth):
        indices = [int(entry)] if np.isscalar(entry) or np.ndim(entry) == 0 else [int(i) for i in entry]
        if not indices:
            raise ValueError(f"{what}[{row}] is empty; every query needs at least one correct candidate")
        bad = [i for i in indices if not 0 <= i < cols]
        if bad:
            raise ValueError(f"{what}[{row}] names candidate {bad[0]}, outside the {cols} columns of the score matrix")
        result.append(indices)
    return result


def ground_truth_ranks(scores, ground_truth, chunk_rows: int = 1024) -> np.ndarray:
    """0-based rank of the best correct candidate of each query (row), ties counted against it.

    Args:
        scores: ``[queries, candidates]`` array-like (numpy or torch, any float dtype); higher = better.
        ground_truth: per row, the correct candidate index or a list of them.
        chunk_rows: rows ranked at once (bounds memory on 5K x 25K matrices).

    Returns:
        int64 array ``[queries]``: how many wrong candidates score >= the best correct one.

    Raises:
        ValueError: not 2-D, NaN scores, or ground truth that does not fit the matrix.
    """
    if hasattr(scores, "detach"):  # torch tensor, without importing torch here
        scores = scores.detach().cpu().float().numpy()
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be a 2-D [queries, candidates] matrix, got shape {scores.shape}")
    rows, cols = scores.shape
    positives = _positives(ground_truth, rows, cols, "ground truth")
    ranks = np.empty(rows, dtype=np.int64)
    for start in range(0, rows, chunk_rows):
        block = scores[start : start + chunk_rows].astype(np.float64)
        if np.isnan(block).any():
            raise ValueError(f"scores contain NaN (rows {start}..{start + len(block) - 1}); check the model's outputs")
        correct = np.zeros(block.shape, dtype=bool)
        for offset, indices in enumerate(positives[start : start + len(block)]):
            correct[offset, indices] = True
        best = np.where(correct, block, -np.inf).max(axis=1)
        ranks[start : start + len(block)] = ((block >= best[:, None]) & ~correct).sum(axis=1)
    return ranks


def recall_at_k(ranks, ks: Iterable[int] = DEFAULT_KS) -> dict[int, float]:
    """Percent of queries whose ground truth rank is below K, for each K."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        raise ValueError("no queries to score")
    return {int(k): 100.0 * float((ranks < int(k)).mean()) for k in ks}


def retrieval_metrics(scores_i2t, scores_t2i, img2txt, txt2img, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """LAVIS's retrieval report: ``txt_r{K}`` (image->text), ``img_r{K}`` (text->image), their means,
    ``r_mean`` and ``agg_metrics`` (= ``r_mean``, what "best checkpoint" selects on).

    Args:
        scores_i2t: ``[images, texts]``; scores_t2i: ``[texts, images]`` (not simply the transpose after
            ITM re-ranking, which re-ranks each direction's own top k).
        img2txt: per image, the indices of its texts. txt2img: per text, its image (or list of images).
        ks: the recall cut-offs.

    Raises:
        ValueError: shapes and ground truth that do not agree (see :func:`ground_truth_ranks`).
    """
    i2t_shape, t2i_shape = np.shape(scores_i2t), np.shape(scores_t2i)
    if len(i2t_shape) != 2 or tuple(t2i_shape) != tuple(i2t_shape[::-1]):
        raise ValueError(f"scores_i2t {tuple(i2t_shape)} and scores_t2i {tuple(t2i_shape)} must be [I, T] and [T, I]")
    txt = recall_at_k(ground_truth_ranks(scores_i2t, img2txt), ks)
    img = recall_at_k(ground_truth_ranks(scores_t2i, txt2img), ks)
    metrics = {f"txt_r{k}": v for k, v in txt.items()}
    metrics.update({f"img_r{k}": v for k, v in img.items()})
    metrics["txt_r_mean"] = sum(txt.values()) / len(txt)
    metrics["img_r_mean"] = sum(img.values()) / len(img)
    metrics["r_mean"] = (metrics["txt_r_mean"] + metrics["img_r_mean"]) / 2
    metrics["agg_metrics"] = metrics["r_mean"]
    return metrics

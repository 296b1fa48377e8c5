"""Retrieval recall on hand-built score matrices with known answers (ties and duplicate captions included),
and the task's pure steps: merging ranks' shares, stable top-k, the pairs to re-rank, the final matrices."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lavis_ext.evaluation.retrieval import ground_truth_ranks, index_captions, recall_at_k, retrieval_metrics
from lavis_ext.tasks.retrieval import merge_shares, pairs_to_rerank, rerank, stable_topk, top_candidates

# 3 images with 2 captions each: texts 0,1 -> image 0; 2,3 -> image 1; 4,5 -> image 2
TEXTS, IMG2TXT, TXT2IMG = index_captions([["a", "b"], ["c", "d"], ["e", "f"]])


def test_index_captions_flattens_in_order():
    assert TEXTS == list("abcdef")
    assert IMG2TXT == [[0, 1], [2, 3], [4, 5]]
    assert TXT2IMG == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="image 1 has no captions"):
        index_captions([["a"], []])


def test_ranks_count_wrong_candidates_above_the_best_correct_one():
    scores = np.array([
        [0.9, 0.1, 0.5, 0.3, 0.2, 0.0],   # image 0: its caption 0 is first -> rank 0
        [0.8, 0.7, 0.6, 0.1, 0.75, 0.0],  # image 1: best own caption 0.6; 0.8, 0.7, 0.75 above -> rank 3
        [0.1, 0.2, 0.3, 0.4, 0.05, 0.35],  # image 2: best own 0.35; only 0.4 above -> rank 1
    ])
    assert ground_truth_ranks(scores, IMG2TXT).tolist() == [0, 3, 1]
    assert recall_at_k([0, 3, 1], ks=(1, 2, 4)) == {1: pytest.approx(100 / 3), 2: pytest.approx(200 / 3), 4: 100.0}


def test_perfect_scores_give_100_everywhere():
    i2t = np.full((3, 6), -1.0)
    for image, texts in enumerate(IMG2TXT):
        i2t[image, texts] = 1.0
    metrics = retrieval_metrics(i2t, i2t.T.copy(), IMG2TXT, TXT2IMG)
    assert all(metrics[k] == 100.0 for k in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"))
    assert metrics["agg_metrics"] == metrics["r_mean"]


def test_a_tie_with_a_wrong_candidate_counts_against_the_model():
    scores = np.array([[0.5, 0.1, 0.5, 0.0, 0.0, 0.0]])  # image 0's caption 0 ties with image 1's caption 2
    assert ground_truth_ranks(scores, [[0, 1]]).tolist() == [1]
    # a tie between two correct captions costs nothing
    assert ground_truth_ranks(np.array([[0.5, 0.5, 0.4, 0.0, 0.0, 0.0]]), [[0, 1]]).tolist() == [0]


def test_a_constant_scorer_gets_no_credit_whatever_the_order():
    """LAVIS's argsort would put some index first and credit whichever image sits there."""
    metrics = retrieval_metrics(np.zeros((3, 6)), np.zeros((6, 3)), IMG2TXT, TXT2IMG)
    assert metrics["txt_r1"] == 0.0 and metrics["img_r1"] == 0.0
    assert ground_truth_ranks(np.zeros((3, 6)), IMG2TXT).tolist() == [4, 4, 4]  # 4 wrong captions tie
    assert ground_truth_ranks(np.zeros((6, 3)), TXT2IMG).tolist() == [2] * 6


def test_ranks_do_not_depend_on_the_order_of_candidates():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(3, 6)).astype(float)  # many ties
    perm = rng.permutation(6)
    inverse = np.argsort(perm)
    permuted_gt = [[int(inverse[t]) for t in texts] for texts in IMG2TXT]
    assert ground_truth_ranks(scores[:, perm], permuted_gt).tolist() == ground_truth_ranks(scores, IMG2TXT).tolist()


def test_duplicate_captions():
    """Image 0 and image 1 both have the sentence "a red circle" (texts 0 and 2): same features, same scores."""
    texts, img2txt, txt2img = index_captions([["a red circle", "a blue square"], ["a red circle"]])
    assert texts[0] == texts[2] and txt2img == [0, 0, 1]
    i2t = np.array([
        [0.9, 0.2, 0.9],   # image 0: own caption 0 ties with image 1's identical caption 2 -> rank 1
        [0.7, 0.1, 0.7],   # image 1: its only caption ties with image 0's caption 0 -> rank 1
    ])
    t2i = np.array([
        [0.9, 0.7],        # "a red circle" (image 0's)
        [0.2, 0.1],        # "a blue square"
        [0.9, 0.7],        # "a red circle" (image 1's): the same row, so image 1 comes second
    ])
    metrics = retrieval_metrics(i2t, t2i, img2txt, txt2img, ks=(1, 2))
    assert (metrics["txt_r1"], metrics["txt_r2"]) == (0.0, 100.0)
    assert ground_truth_ranks(t2i, txt2img).tolist() == [0, 0, 1]
    assert metrics["img_r1"] == pytest.approx(200 / 3)
    # a text may name every image it describes: then the duplicate is right for both
    assert ground_truth_ranks(t2i, [[0, 1], 0, [0, 1]]).tolist() == [0, 0, 0]


def test_candidates_left_at_minus_infinity_rank_last():
    scores = np.array([[-math.inf, 0.3, 0.2, -math.inf, -math.inf, -math.inf]])  # own caption 0 not re-ranked
    assert ground_truth_ranks(scores, [[0]]).tolist() == [5]  # ties every other -inf, after the finite ones


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="NaN"):
        ground_truth_ranks(np.array([[np.nan, 1.0]]), [0])
    with pytest.raises(ValueError, match="has 2 entries for a score matrix with 1 rows"):
        ground_truth_ranks(np.zeros((1, 2)), [0, 1])
    with pytest.raises(ValueError, match="outside the 2 columns"):
        ground_truth_ranks(np.zeros((1, 2)), [2])
    with pytest.raises(ValueError, match=r"\[0\] is empty"):
        ground_truth_ranks(np.zeros((1, 2)), [[]])
    with pytest.raises(ValueError, match=r"must be \[I, T\] and \[T, I\]"):
        retrieval_metrics(np.zeros((3, 6)), np.zeros((3, 6)), IMG2TXT, TXT2IMG)


def test_torch_tensors_are_accepted():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3, 0.2, 0.0]])
    assert ground_truth_ranks(scores, [[0, 1]]).tolist() == [0]


# ---- the task's steps ---------------------------------------------------------------------------
def record(image_id, captions):
    return {"image_id": image_id, "captions": captions}


def test_merge_shares_orders_by_image_id_and_keeps_a_padded_repeat_once():
    rank0 = [record("img-3", ["c"]), record("img-1", ["a"])]
    rank1 = [record("img-2", ["b"]), record("img-3", ["c"])]  # img-3 again: a padded DistributedSampler
    owners, ordered = merge_shares([rank0, rank1])
    assert [r["image_id"] for r in ordered] == ["img-1", "img-2", "img-3"]
    assert owners == [0, 1, 0]
    # the same images from one process: the same order
    assert [r["image_id"] for r in merge_shares([rank1 + rank0])[1]] == ["img-1", "img-2", "img-3"]
    with pytest.raises(ValueError, match="image_id 'img-3' appears twice with different captions"):
        merge_shares([[record("img-3", ["c"])], [record("img-3", ["x"])]])
    with pytest.raises(ValueError, match="no images"):
        merge_shares([[], []])


def test_stable_topk_breaks_ties_by_lower_index():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.5, 0.1]])
    assert stable_topk(scores, 3).tolist() == [[1, 0, 2]]
    assert stable_topk(scores, 10).shape == (1, 5)  # k larger than the candidates: all of them


def test_rerank_scores_the_top_k_with_itm_plus_itc_and_leaves_the_rest_at_minus_infinity():
    sims = torch.tensor([[0.9, 0.8, 0.1], [0.2, 0.7, 0.6]])  # 2 images x 3 texts
    top_i2t, top_t2i = top_candidates(sims, 2)
    assert top_i2t.tolist() == [[0, 1], [1, 2]] and top_t2i.tolist() == [[0, 1], [0, 1], [1, 0]]
    wanted = pairs_to_rerank(top_i2t, top_t2i, sims.shape)
    assert wanted.tolist() == [[True, True, True], [True, True, True]]
    itm = torch.tensor([[0.0, 1.0, 5.0], [3.0, -1.0, 0.0]])
    i2t, t2i = rerank(sims, itm, top_i2t, top_t2i)
    assert i2t[0].tolist() == pytest.approx([0.9, 1.8, -math.inf])  # ITM moved text 1 above text 0
    assert i2t[1].tolist() == pytest.approx([-math.inf, -0.3, 0.6])
    assert t2i[0].tolist() == pytest.approx([0.9, 3.2])  # text 0: image 1 wins after ITM
    with pytest.raises(RuntimeError, match="has no ITM score"):
        rerank(sims, torch.full((2, 3), float("nan")), top_i2t, top_t2i)

"""Vectorised CIDEr-D against pycocoevalcap's Cider, per image and for the corpus (1e-12)."""
from __future__ import annotations

import random

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider

from lavis_ext.evaluation.cider import CiderD, cider_d

WORDS = "a an the red blue green circle square triangle left of right above below big small two three".split()


def _sentence(rng: random.Random, low=0, high=12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def _corpus(seed: int, images: int):
    rng = random.Random(seed)
    refs = {f"img{i}": [_sentence(rng, 1) for _ in range(rng.randint(1, 5))] for i in range(images)}
    hyps = {k: [_sentence(rng)] for k in refs}  # some empty, some one word (no bigram: length 0)
    return refs, hyps


@pytest.mark.parametrize("seed,images", [(0, 1), (1, 2), (2, 40), (3, 300)])
def test_equals_pycocoevalcap_per_image_and_corpus(seed, images):
    refs, hyps = _corpus(seed, images)
    want_mean, want = Cider().compute_score(refs, hyps)
    got_mean, got = CiderD(refs).score(hyps)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert got_mean == pytest.approx(want_mean, abs=1e-12)


def test_quirks_are_pycocoevalcap_s():
    # "the" is in every image's references: weight log(N) - log(N) = 0; the length penalty counts bigrams
    refs = {1: ["the red circle", "the circle"], 2: ["the blue square above the circle"], 3: ["the big one"]}
    for hyp in ("the", "the red circle", "red circle circle circle", "", "zebra crossing unseen words"):
        hyps = {k: [hyp] for k in refs}
        assert cider_d(refs, hyps) == pytest.approx(Cider().compute_score(refs, hyps)[0], abs=1e-12)


def test_prepared_references_score_many_candidate_sets():
    refs, _ = _corpus(5, 60)
    scorer = CiderD(refs)
    for seed in range(3):
        _, hyps = _corpus(100 + seed, 60)
        hyps = {k: hyps[f"img{i}"] for i, k in enumerate(refs)}
        assert scorer.score(hyps)[0] == pytest.approx(Cider().compute_score(refs, hyps)[0], abs=1e-12)


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="at least one reference"):
        CiderD({1: ["a b"], 2: []})
    scorer = CiderD({1: ["a b"], 2: ["c d"]})
    with pytest.raises(ValueError, match="missing e.g. \\[2\\]"):
        scorer.score({1: ["a"]})
    with pytest.raises(ValueError, match="exactly one"):
        scorer.score({1: ["a", "b"], 2: ["c"]})


def test_beyond_65535_words_falls_back_to_pycocoevalcap():
    from lavis_ext.evaluation.cider import TooManyWords, cider_scorer

    refs = {i: [" ".join(f"w{i}x{j}" for j in range(700)), "w0x1 shared words"] for i in range(100)}  # 70,000 words
    hyps = {i: ["shared words w0x1"] for i in refs}
    with pytest.raises(TooManyWords, match="70002 distinct words"):
        cider_d(refs, hyps)
    assert cider_scorer(refs)(hyps) == Cider().compute_score(refs, hyps)[0]
    small = {i: refs[i][1:] for i in refs}
    assert cider_scorer(small)(hyps) == pytest.approx(Cider().compute_score(small, hyps)[0], abs=1e-12)

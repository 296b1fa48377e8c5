"""CIDEr-D as pycocoevalcap's ``Cider().compute_score`` computes it, with the per-n-gram Python loops done by numpy.

Why not pycocoevalcap's class: its ``sim`` walks every hypothesis n-gram in Python for every (hypothesis,
reference) pair and rebuilds each reference's tf-idf vector once per use; on 5,000 captions x 5 references that is
the critical path of caption scoring (METEOR runs beside it in its own JVM). Here the Python part is only the
n-gram extraction (the same ``s.split()`` and n-gram tuples as pycocoevalcap's ``precook``); counting, document
frequencies, tf-idf weights, norms, the clipped overlaps and the length penalty are array operations over all
pairs at once. The references' side is prepared once, so :meth:`CiderD.score` of many candidate sets against the
same references (the demo's best-constant-caption search) pays for it once.

Exactly pycocoevalcap 1.2's formula, quirks included (checked against it to 1e-12 in the tests):

- n-grams of 1..4 words; document frequency = number of images whose references contain the n-gram;
  weight = ``log(N images) - log(max(1, df))``, times the term count;
- the Gaussian length penalty uses the number of *bigrams* as the length (``counts2vec`` adds term counts where
  ``n == 1`` with ``n = len(ngram) - 1``), sigma 6;
- the overlap of a pair is ``sum min(v_hyp, v_ref) * v_ref`` per n, divided by both norms when both are non-zero;
- an image scores ``10 * mean_n(sum over references) / number of references``; the corpus score is the mean.

Only the order of floating-point additions differs from pycocoevalcap (differences of about 1e-15).
"""
from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np

__all__ = ["CiderD", "TooManyWords", "cider_d", "cider_scorer"]

N = 4
SIGMA = 6.0


class TooManyWords(ValueError):
    """More distinct words than 64-bit n-gram keys hold (65,535); pycocoevalcap's Cider has no such limit."""


def _distinct(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values of an int64 array, by a sort and a difference (numpy 2.4's hash-based ``np.unique``
    took 1.4 s on a million keys, the sort 0.1 s)."""
    ranked = np.sort(values)
    return ranked[np.r_[True, ranked[1:] != ranked[:-1]]] if len(ranked) else ranked


def _order_of(keys: np.ndarray) -> np.ndarray:
    """n - 1 of each n-gram key: a k-gram's key lies in [B^(k-1), B^k)."""
    order = np.zeros(len(keys), dtype=np.int64)
    for k in range(1, N):
        order += keys >= _Ngrams.BASE**np.uint64(k)
    return order


class _Ngrams:
    """Sentences -> distinct (sentence, n-gram) rows with their counts, vectorised.

    Words get ids 1..65535 from one vocabulary shared by every call (references first, then candidates), and an
    n-gram of k words is the base-65536 number of its word ids: keys of different orders never collide and the
    same n-gram has the same key in every call. Beyond 65,535 distinct words the keys would overflow 64 bits, and
    :meth:`encode` raises (COCO's vocabulary is ~10k words).
    """

    BASE = np.uint64(1 << 16)

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def encode(self, sentences: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Returns ``(sentence, rank, count)`` per distinct n-gram of each sentence, sorted by (sentence, rank),
        where ``universe[rank]`` is the n-gram's key; then ``universe`` (sorted distinct keys of this call) and
        each sentence's bigram count (pycocoevalcap's length)."""
        tokens = [sentence.split() for sentence in sentences]
        lengths = np.fromiter((len(t) for t in tokens), dtype=np.int64, count=len(tokens))
        vocab = self.vocab
        words = np.fromiter(
            (vocab.setdefault(w, len(vocab) + 1) for t in tokens for w in t), dtype=np.uint64, count=int(lengths.sum())
        )
        if len(vocab) >= 1 << 16:
            raise TooManyWords(
                f"{len(vocab)} distinct words: more than the 65,535 this CIDEr-D's 64-bit n-gram keys hold; "
                "score with pycocoevalcap's Cider instead"
            )
        sentence_of = np.repeat(np.arange(len(tokens), dtype=np.int64), lengths)
        # words left in the sentence from each position on
        left = np.repeat(lengths, lengths) - (np.arange(len(words)) - np.repeat(np.cumsum(lengths) - lengths, lengths))
        keys, sents = [], []
        key = words
        for k in range(1, N + 1):
            if k > 1:  # extend each (k-1)-gram by the next word (wraps only where it crosses a sentence: dropped)
                key = key[:-1] * self.BASE + words[k - 1 :]
            starts = np.flatnonzero(left[: len(key)] >= k)
            keys.append(key[starts])
            sents.append(sentence_of[starts])
        universe, rank = np.unique(np.concatenate(keys), return_inverse=True)
        pairs = np.sort(np.concatenate(sents) * np.int64(max(len(universe), 1)) + rank)
        first = np.flatnonzero(np.r_[True, pairs[1:] != pairs[:-1]]) if len(pairs) else np.zeros(0, dtype=np.int64)
        counts = np.diff(np.append(first, len(pairs))).astype(np.float64)
        width = np.int64(max(len(universe), 1))
        return pairs[first] // width, pairs[first] % width, counts, universe, np.maximum(lengths - 1, 0)


class CiderD:
    """CIDEr-D against fixed references: prepare once, then :meth:`score` any number of candidate sets.

    Args:
        references: ``{id: [tokenised reference, ...]}`` (PTB-tokenised strings, as pycocoevalcap expects),
            at least one per id.

    Raises:
        ValueError: an id without references.
        TooManyWords: more distinct words than :class:`_Ngrams` can key (use pycocoevalcap's Cider).
    """

    def __init__(self, references: Mapping[Hashable, Sequence[str]]):
        self.keys = list(references)
        refs_per_image = [list(references[k]) for k in self.keys]
        empty = [k for k, refs in zip(self.keys, refs_per_image) if not refs]
        if empty:
            raise ValueError(f"CIDEr-D needs at least one reference per id; {len(empty)} have none, e.g. {empty[0]!r}")
        self.position = {k: i for i, k in enumerate(self.keys)}
        self.num_refs = np.array([len(r) for r in refs_per_image], dtype=np.float64)
        self._grams = _Ngrams()
        self.ref_image = np.repeat(np.arange(len(self.keys), dtype=np.int64), [len(r) for r in refs_per_image])
        sent, rank, count, self.universe, self.ref_length = self._grams.encode([r for refs in refs_per_image for r in refs])
        self.width = np.int64(max(len(self.universe), 1))
        # document frequency: the number of images whose references hold the n-gram (once per image)
        image = self.ref_image[sent]
        self.df = np.bincount(_distinct(image * self.width + rank) % self.width, minlength=int(self.width)).astype(np.float64)
        self.ref_len = np.log(float(len(self.keys)))
        self.ref_sent, self.ref_order = sent, _order_of(self.universe[rank])
        self.ref_value = count * (self.ref_len - np.log(np.maximum(1.0, self.df[rank])))
        self.ref_norm = _norms(sent, self.ref_order, self.ref_value, len(self.ref_image))
        # (image, n-gram) of every reference row, sorted, for the candidates to find their matches in
        pairs = image * self.width + rank
        self.pair_order = np.argsort(pairs, kind="stable")
        self.sorted_pairs = pairs[self.pair_order]

    def score(self, candidates: Mapping[Hashable, Sequence[str] | str]) -> tuple[float, np.ndarray]:
        """``(corpus CIDEr-D, per-id scores in the references' order)`` of one tokenised candidate per id.

        Raises:
            ValueError: the candidates' ids differ from the references', or an id has not exactly one candidate.
        """
        if set(candidates) != set(self.position) or len(candidates) != len(self.position):
            missing = [k for k in self.keys if k not in candidates][:3]
            extra = [k for k in candidates if k not in self.position][:3]
            raise ValueError(f"candidate ids must equal the reference ids (missing e.g. {missing}, extra e.g. {extra})")
        hyps = []
        for k in self.keys:
            value = candidates[k]
            if not isinstance(value, str):
                if len(value) != 1:
                    raise ValueError(f"id {k!r} has {len(value)} candidates; CIDEr-D scores exactly one per id")
                value = value[0]
            hyps.append(value)
        return self._score(hyps)

    def _score(self, hyps: list[str]) -> tuple[float, np.ndarray]:
        images, refs = len(self.keys), len(self.ref_image)
        sent, rank, count, universe, length = self._grams.encode(hyps)
        # the candidates' n-grams in the references' universe (df 0 where no reference has them)
        at = np.minimum(np.searchsorted(self.universe, universe), len(self.universe) - 1)
        known_key = self.universe[at] == universe
        ref_rank = at[rank]
        known = known_key[rank]
        df = np.where(known, self.df[ref_rank], 0.0)
        value = count * (self.ref_len - np.log(np.maximum(1.0, df)))
        norm = _norms(sent, _order_of(universe[rank]), value, images)

        # each candidate n-gram meets the rows of the same n-gram in its image's references (0 to #refs of them)
        cand = np.flatnonzero(known)
        query = sent[cand] * self.width + ref_rank[cand]
        lo = np.searchsorted(self.sorted_pairs, query, side="left")
        hits = np.searchsorted(self.sorted_pairs, query, side="right") - lo
        cand = np.repeat(cand, hits)
        offsets = np.arange(int(hits.sum())) - np.repeat(np.cumsum(hits) - hits, hits)
        row = self.pair_order[np.repeat(lo, hits) + offsets]
        v_ref = self.ref_value[row]
        overlap = np.minimum(value[cand], v_ref) * v_ref
        val = np.bincount(self.ref_sent[row] * N + self.ref_order[row], weights=overlap, minlength=refs * N)
        val = val.astype(np.float64).reshape(refs, N)

        norms = norm[self.ref_image] * self.ref_norm
        val = np.divide(val, norms, out=val, where=norms != 0)  # pycocoevalcap leaves the overlap (0) alone there
        delta = (length[self.ref_image] - self.ref_length).astype(np.float64)
        val *= np.exp(-(delta**2) / (2 * SIGMA**2))[:, None]

        per_image = np.stack([np.bincount(self.ref_image, weights=val[:, n], minlength=images) for n in range(N)], axis=1)
        scores = per_image.mean(axis=1) / self.num_refs * 10.0
        return float(scores.mean()), scores


def _norms(sent: np.ndarray, order: np.ndarray, values: np.ndarray, rows: int) -> np.ndarray:
    """The Euclidean norm of each sentence's tf-idf vector, per n-gram order: ``(rows, N)``."""
    squares = np.bincount(sent * N + order, weights=values * values, minlength=rows * N).astype(np.float64)
    return np.sqrt(squares).reshape(rows, N)


def cider_d(references: Mapping[Hashable, Sequence[str]], candidates: Mapping[Hashable, Sequence[str] | str]) -> float:
    """Corpus CIDEr-D of tokenised ``candidates`` against tokenised ``references`` (pycocoevalcap's number)."""
    return CiderD(references).score(candidates)[0]


def cider_scorer(references: Mapping[Hashable, Sequence[str]]):
    """``candidates -> corpus CIDEr-D`` against ``references`` prepared once: :class:`CiderD`, or pycocoevalcap's
    ``Cider`` where the vocabulary is beyond the vectorised keys' reach (:class:`TooManyWords`)."""
    try:
        scorer = CiderD(references)
    except TooManyWords:
        from pycocoevalcap.cider.cider import Cider

        return lambda candidates: float(Cider().compute_score(references, candidates)[0])
    return lambda candidates: scorer.score(candidates)[0]

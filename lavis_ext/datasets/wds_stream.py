"""A webdataset training split streamed LAION-style: shards sampled with replacement, forever.

Why: at LAION scale (hundreds of millions of samples, thousands of shards, shards added while training)
"each sample exactly once per epoch" is neither needed nor affordable, and a length is often unknown.
LAVIS's ``laion2B_multi`` pipeline resamples shards (webdataset ``ResampledShards``) but seeds nothing,
knows only ``{"image", "text_input"}`` and counts no bad samples. :class:`ResampledWdsDataset` is
:class:`~lavis_ext.datasets.wds_pipeline.WdsSplitDataset` with only its shard source replaced, so the
validation, the shuffle buffer, decoding, the output modes and the skip counting are the same code.

Each reader (rank x DataLoader worker) draws its shards independently and uniformly with replacement
from ``random.Random("<seed>:<epoch>:<rank>:<worker>:resampled")``: the stream is a pure function of
(seed, epoch, rank, worker), so a run with the same number of processes and workers sees the same data
again, and no reader needs a share of the shard list (any shard count works with any number of readers).
``epoch`` is the runner's *pass*: the training loader restarts the stream with ``set_epoch(pass + 1)``
every ``steps_per_epoch`` (runner_base) or ``iters_per_inner_epoch`` (runner_iter) batches, which is what
bounds the replay a resume needs (docs/distributed.md).

A reader that draws ``max(50, 2 x shards)`` shards in a row without one usable sample stops with an
error (every shard broken or empty) rather than spinning forever.
"""
from __future__ import annotations

import random
from typing import Iterable, Iterator

from lavis_ext.datasets.wds_pipeline import WdsSplitDataset

__all__ = ["ResampledWdsDataset"]


class ResampledWdsDataset(WdsSplitDataset):
    """An endless training stream over ``urls`` (arguments as :class:`WdsSplitDataset`).

    ``length`` is optional: when given, ``len()`` is the nominal size of one epoch (runner_base needs it);
    runner_iter needs none. Only training modes make sense (evaluation must read each sample once).

    Raises:
        ValueError: an evaluation mode (``caption_eval`` / ``vqa_eval``), plus everything
            :class:`WdsSplitDataset` raises.
    """

    #: the runners' loaders read this: the stream never ends, so passes are cut by a step count
    resampled = True

    def __init__(self, urls, mode: str, **kwargs):
        if not str(mode).endswith("_train"):
            raise ValueError(
                f"resampled streaming is for training splits; mode {mode!r} must read each sample once "
                "(use WdsSplitDataset, or build_info.resampled only for the train split)"
            )
        super().__init__(urls, mode, **kwargs)
        self._draws_without_sample = 0

    def __repr__(self) -> str:
        n = "?" if self.num_samples is None else self.num_samples
        return f"ResampledWdsDataset({self.name!r}, mode={self.mode!r}, shards={len(self.urls)}, epoch length={n})"

    def _shard_source(self) -> Iterator[dict]:
        """Uniform draws with replacement, seeded per (seed, epoch, rank, worker)."""
        r = self._reader()
        rng = random.Random(f"{self.seed}:{self.epoch}:{r.rank}:{r.worker}:resampled")
        limit = max(50, 2 * len(self.urls))
        self._draws_without_sample = 0
        while True:
            if self._draws_without_sample >= limit:
                raise RuntimeError(
                    f"{self.name}: {self._draws_without_sample} shards drawn in a row gave no usable sample "
                    f"(skipped so far: {dict(self.skipped)}); check the shards under {self.urls[0]!r} ..."
                )
            self._draws_without_sample += 1
            yield {"url": rng.choice(self.urls)}

    def _own_samples(self, src: Iterable[dict]) -> Iterator[dict]:
        """No share to take: every reader draws its own shards."""
        yield from src

    def _format(self, unit: dict, image) -> dict:
        self._draws_without_sample = 0  # a usable sample came out of the latest shards
        return super()._format(unit, image)

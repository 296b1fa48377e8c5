"""Training loaders with a length and a restorable position: one stream, or several mixed by ratio.

runner_base needs `len(train_loader)` and `next()`; webdataset pipelines give neither, and exact
resume needs the position inside a pass (see docs/distributed.md). LAVIS mixes several training
loaders with `MultiIterLoader`, which draws from the global `random` and has no state, so a resumed
mixed run cannot continue where it stopped: :class:`MixedLoader` replaces it.
"""
from __future__ import annotations

import logging
import math
import random
from typing import Sequence

import torch
from torch.utils.data import ChainDataset, DataLoader

logger = logging.getLogger(__name__)


def _batch_len(batch) -> int:
    if isinstance(batch, dict):
        for value in batch.values():
            if torch.is_tensor(value) and value.dim() > 0:
                return int(value.shape[0])
            if isinstance(value, (list, tuple)):
                return len(value)
    try:
        return len(batch)
    except TypeError:
        return 1


class EpochStreamLoader:
    """An endless iterator over a DataLoader, `len()` = steps per epoch, with a restorable position.

    runner_base needs `len(train_loader)` and `next()`; webdataset pipelines give neither. Every rank
    takes the same number of steps (``length // (world * batch)``), so DDP never waits on a rank
    that ran out; a pass that ends early continues into the next pass, with a new shuffle epoch
    (``set_epoch`` of the dataset and of the sampler). Each pass re-seeds the loader's own generator
    from (seed, pass, rank), so worker seeds never draw from the global torch RNG.

    The position is ``{"pass", "batches", "samples", "samples_total"}``: the pass being read, batches and
    samples taken from it, and samples taken since the run started. :meth:`load_state_dict` +
    :meth:`fast_forward` re-create that pass and drop its consumed batches.

    ``pass_steps``: end a pass after that many batches. An endless stream (resampled shards) never ends
    a pass on its own; cutting it gives each pass its own shuffle seed and bounds the replay of a resume
    to one pass.
    """

    def __init__(self, loader: DataLoader, dataset, steps_per_epoch: int, first_pass: int = 0, seed: int = 0, rank: int = 0,
                 pass_steps: int | None = None):
        self.loader = loader
        self.dataset = dataset
        self.steps_per_epoch = steps_per_epoch
        self.pass_steps = int(pass_steps) if pass_steps else None
        self.pass_index = first_pass  # the pass the next restart reads (a resumed run continues the sequence)
        self.seed, self.rank = int(seed), int(rank)
        self.current_pass = None
        self.batches_in_pass = 0
        self.samples_in_pass = 0
        self.samples_total = 0
        self._skip = 0
        self._it = None

    def _restart(self):
        p = self.pass_index
        # a ChainDataset (several webdataset splits chained, as LAVIS does) passes the epoch to each
        members = self.dataset.datasets if isinstance(self.dataset, ChainDataset) else [self.dataset]
        for member in members:
            if hasattr(member, "set_epoch"):
                member.set_epoch(p)
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(p)
        generator = getattr(self.loader, "generator", None)
        if generator is not None:
            generator.manual_seed((self.seed * 1_000_003 + p) * 1009 + self.rank)
        self.current_pass, self.pass_index = p, p + 1
        self.batches_in_pass = self.samples_in_pass = 0
        self._it = iter(self.loader)

    def _next_batch(self):
        if self._it is None or (self.pass_steps is not None and self.batches_in_pass >= self.pass_steps):
            self._restart()
        try:
            batch = next(self._it)
        except StopIteration:
            if self.batches_in_pass == 0:
                raise RuntimeError(f"training pass {self.current_pass} yielded no batch") from None
            self._restart()
            batch = next(self._it)
        self.batches_in_pass += 1
        n = _batch_len(batch)
        self.samples_in_pass += n
        self.samples_total += n
        return batch

    def fast_forward(self) -> int:
        """Drop the batches a restored position says were consumed. Returns how many."""
        dropped = 0
        while self._skip:
            self._skip -= 1
            self._next_batch()
            dropped += 1
        return dropped

    def __next__(self):
        self.fast_forward()
        return self._next_batch()

    def __iter__(self):
        return self

    def __len__(self):
        return self.steps_per_epoch

    def state_dict(self) -> dict:
        if self.current_pass is None:
            return {"pass": self.pass_index, "batches": 0, "samples": 0, "samples_total": self.samples_total}
        if self.pass_steps is not None and self.batches_in_pass >= self.pass_steps:
            # a cut pass that is complete: the same position as the start of the next one, with nothing to replay
            return {"pass": self.current_pass + 1, "batches": 0, "samples": 0, "samples_total": self.samples_total}
        return {"pass": self.current_pass, "batches": self.batches_in_pass, "samples": self.samples_in_pass,
                "samples_total": self.samples_total}

    def load_state_dict(self, state: dict) -> None:
        if "mix" in state:
            raise ValueError(
                f"the checkpoint's data position mixes {', '.join(state['mix']['names'])}, but this run trains on "
                "one dataset; resume with the datasets and sample ratios it was written with"
            )
        self.pass_index = int(state["pass"])
        self._skip = int(state["batches"])
        self._it, self.current_pass = None, None
        self.samples_total = int(state.get("samples_total", 0)) - int(state.get("samples", 0))


class MixedLoader:
    """Batches drawn from several training loaders by ratio, from a seeded RNG, with a restorable position.

    Replaces LAVIS's ``MultiIterLoader`` (same rule: each batch comes whole from one loader, picked with
    probability ``ratio / sum(ratios)``), but the picks come from ``random.Random("<seed>:<rank>:mix")``,
    not the global ``random``, so they are reproducible and independent of everything else that draws
    random numbers. Each child keeps its own position (an :class:`EpochStreamLoader`: it cycles passes
    on its own), so a child that runs out starts its next pass while the others go on.

    ``len()`` is ``steps_per_epoch``: what the runner calls an epoch (runner_base: the children's steps per
    epoch summed, as if concatenated; runner_iter: ``iters_per_inner_epoch``).

    The position (:meth:`state_dict`) is ``{"mix": {"names", "ratios", "draws", "counts"}, "children":
    {name: child position}}``; :meth:`load_state_dict` re-seeds the RNG and repeats ``draws`` picks
    (microseconds each), each child restores its own position, and :meth:`fast_forward` replays the
    children's consumed batches of their current passes.

    Raises:
        ValueError: no loaders, names/ratios that do not match them, a ratio that is not a positive number.
    """

    def __init__(self, loaders: Sequence, ratios: Sequence[float] | None = None, names: Sequence[str] | None = None,
                 seed: int = 0, rank: int = 0, steps_per_epoch: int | None = None):
        if not loaders:
            raise ValueError("MixedLoader needs at least one loader")
        names = [str(n) for n in (names or [f"loader{i}" for i in range(len(loaders))])]
        ratios = [1.0] * len(loaders) if ratios is None else [float(r) for r in ratios]
        if len(names) != len(loaders) or len(ratios) != len(loaders):
            raise ValueError(f"{len(loaders)} loaders but {len(names)} names and {len(ratios)} ratios")
        bad = [f"{n}={r}" for n, r in zip(names, ratios) if not (math.isfinite(r) and r > 0)]
        if bad:
            raise ValueError(f"sample ratios must be positive numbers; got {', '.join(bad)}")
        self.loaders = list(loaders)
        self.names = names
        self.ratios = ratios
        self._cum = []
        total = 0.0
        for r in ratios:
            total += r
            self._cum.append(total)
        self.seed, self.rank = int(seed), int(rank)
        self.steps_per_epoch = steps_per_epoch
        self._reset_rng(0)

    def _reset_rng(self, draws: int) -> None:
        self._rng = random.Random(f"{self.seed}:{self.rank}:mix")
        self.draws, self.counts = 0, [0] * len(self.loaders)
        for _ in range(int(draws)):
            self._pick()

    def _pick(self) -> int:
        index = self._rng.choices(range(len(self.loaders)), cum_weights=self._cum)[0]
        self.draws += 1
        self.counts[index] += 1
        return index

    def __next__(self):
        return next(self.loaders[self._pick()])

    def __iter__(self):
        return self

    def __len__(self):
        if self.steps_per_epoch is None:
            raise TypeError("this MixedLoader has no epoch length (steps_per_epoch=None)")
        return self.steps_per_epoch

    def fast_forward(self) -> int:
        """Replay every child's consumed batches of its current pass. Returns how many in all."""
        return sum(loader.fast_forward() for loader in self.loaders if hasattr(loader, "fast_forward"))

    def state_dict(self) -> dict:
        return {
            "mix": {"names": self.names, "ratios": self.ratios, "draws": self.draws, "counts": list(self.counts)},
            "children": {name: (loader.state_dict() if hasattr(loader, "state_dict") else None)
                         for name, loader in zip(self.names, self.loaders)},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore picks and children. Children are matched by name; a changed mix (other ratios, datasets
        added or removed) continues from what still matches, with a warning, since it cannot be exact."""
        if "mix" not in state:
            raise ValueError(
                "the checkpoint's data position is a single loader's, but this run mixes "
                f"{', '.join(self.names)}; resume with the datasets it was written with"
            )
        mix, children = state["mix"], state.get("children") or {}
        if list(mix.get("names", [])) != self.names or [float(r) for r in mix.get("ratios", [])] != self.ratios:
            logger.warning(
                "the mix changed since the checkpoint (was %s with ratios %s, now %s with %s): data positions "
                "are restored by name, the picks that follow are not those the old mix would have made",
                mix.get("names"), mix.get("ratios"), self.names, self.ratios,
            )
        self._reset_rng(int(mix.get("draws", 0)))
        for name, loader in zip(self.names, self.loaders):
            position = children.get(name)
            if position is not None and hasattr(loader, "load_state_dict"):
                loader.load_state_dict(position)
            elif name not in children:
                logger.warning("mixed dataset %s is not in the checkpoint's position: it starts from its beginning", name)

"""The training loader runner_base needs for webdataset splits: a length and resumable position.

runner_base needs `len(train_loader)` and `next()`; webdataset pipelines give neither, and exact
resume needs the position inside a pass (see docs/distributed.md).
"""
from __future__ import annotations

import logging

import torch
from torch.utils.data import DataLoader

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
    """

    def __init__(self, loader: DataLoader, dataset, steps_per_epoch: int, first_pass: int = 0, seed: int = 0, rank: int = 0):
        self.loader = loader
        self.dataset = dataset
        self.steps_per_epoch = steps_per_epoch
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
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(p)
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
        if self._it is None:
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
        return {"pass": self.current_pass, "batches": self.batches_in_pass, "samples": self.samples_in_pass,
                "samples_total": self.samples_total}

    def load_state_dict(self, state: dict) -> None:
        self.pass_index = int(state["pass"])
        self._skip = int(state["batches"])
        self._it, self.current_pass = None, None
        self.samples_total = int(state.get("samples_total", 0)) - int(state.get("samples", 0))

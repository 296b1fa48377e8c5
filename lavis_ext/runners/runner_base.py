"""`runner_base`, fixed for CPU, webdataset splits with a known length, and resume.

Once `lavis_ext` is imported the registry name ``runner_base`` resolves to :class:`RunnerBaseExt`
(LAVIS's class stays reachable as ``runner_base_lavis``). Each override names what it fixes in
LAVIS 1.0.2; nothing is copied.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from lavis.common.dist_utils import get_rank, get_world_size, is_main_process, main_process
from lavis.common.registry import registry
from lavis.datasets.datasets.dataloader_utils import IterLoader, MultiIterLoader
from lavis.runners.runner_base import RunnerBase
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import ChainDataset, DataLoader, DistributedSampler, IterableDataset

from lavis_ext.checkpoints import load_trainable, restore_optimizer, save_checkpoint
from lavis_ext.models.strategies import format_parameter_report
from lavis_ext.runners.tracking import RunTracker
from lavis_ext.tasks.base import resolve_amp_dtype

logger = logging.getLogger(__name__)


class EpochStreamLoader:
    """An endless iterator over an IterableDataset with a known length, `len()` = steps per epoch.

    runner_base needs `len(train_loader)` and `next()`; webdataset pipelines give neither. Every rank
    takes the same number of steps (``length // (world * batch)``), so DDP never waits on a rank
    that ran out; a pass that ends early continues into the next pass, with a new shuffle epoch.
    """

    def __init__(self, loader: DataLoader, dataset, steps_per_epoch: int, first_pass: int = 0):
        self.loader = loader
        self.dataset = dataset
        self.steps_per_epoch = steps_per_epoch
        self.pass_index = first_pass  # a resumed run continues the shuffle sequence at its epoch
        self._it = None

    def _restart(self):
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.pass_index)
        self.pass_index += 1
        self._it = iter(self.loader)

    def __next__(self):
        if self._it is None:
            self._restart()
        try:
            return next(self._it)
        except StopIteration:
            self._restart()
            return next(self._it)

    def __iter__(self):
        return self

    def __len__(self):
        return self.steps_per_epoch


@registry.register_runner("runner_base_ext")
class RunnerBaseExt(RunnerBase):
    def __init__(self, cfg, task, model, datasets, job_id):
        # A second runner in one process: KeyError: "Name 'result_dir' already registered." (registry.py:200)
        for key in ("result_dir", "output_dir"):
            registry.mapping["paths"].pop(key, None)
        super().__init__(cfg, task, model, datasets, job_id)
        self.tracker = RunTracker(self.output_dir, enabled=is_main_process())
        if hasattr(task, "attach_run"):
            task.attach_run(run_cfg=cfg.run_cfg, tracker=self.tracker)

    # ---- model / device ----------------------------------------------------------------------
    @property
    def model(self):
        """Move once, wrap once. LAVIS sets the wrapped model only when the device changes, so on CPU
        it returns None (AttributeError: 'NoneType' object has no attribute 'train', runner_base.py:429),
        and passes `device_ids=[gpu]` for CPU modules (ValueError from DDP)."""
        if self._wrapped_model is None:
            if self._model.device != self.device:
                self._model = self._model.to(self.device)
            if self.use_distributed:
                device_ids = [self.device.index] if self.device.type == "cuda" else None
                self._wrapped_model = DDP(self._model, device_ids=device_ids)
            else:
                self._wrapped_model = self._model
        return self._wrapped_model

    @property
    def scaler(self):
        """A loss scaler only where it is needed: fp16 autocast on a GPU. LAVIS creates
        `torch.cuda.amp.GradScaler` whenever `amp` is on (also for bf16, and on CPU)."""
        if self._scaler is None and self.config.run_cfg.get("amp", False):
            if resolve_amp_dtype(self.config.run_cfg, self.device, self._model) == torch.float16:
                self._scaler = torch.amp.GradScaler(self.device.type)
        return self._scaler

    def setup_output_dir(self):
        """A relative `run.output_dir` is relative to the working directory. LAVIS joins it to the
        library root, which puts runs inside site-packages/lavis."""
        output_dir = Path(self.config.run_cfg.output_dir).expanduser().resolve() / self.job_id
        result_dir = output_dir / "result"
        result_dir.mkdir(parents=True, exist_ok=True)
        registry.register_path("result_dir", str(result_dir))
        registry.register_path("output_dir", str(output_dir))
        self.result_dir, self.output_dir = result_dir, output_dir

    # ---- data -------------------------------------------------------------------------------
    def create_loaders(self, datasets, num_workers, batch_sizes, is_trains, collate_fns, dataset_ratios=None):
        """No CUDA prefetch stream (LAVIS's PrefetchLoader creates a CUDA stream and fails on CPU),
        and IterableDatasets with a known length become epoch-sized loaders (LAVIS supports them only
        in runner_iter)."""
        loaders = []
        for dataset, bsz, is_train, collate_fn in zip(datasets, batch_sizes, is_trains, collate_fns):
            if isinstance(dataset, (list, tuple)):
                loaders.append(
                    MultiIterLoader(
                        loaders=[self._make_loader(d, num_workers, bsz, is_train, collate_fn[i]) for i, d in enumerate(dataset)],
                        ratios=dataset_ratios,
                    )
                )
            else:
                loaders.append(self._make_loader(dataset, num_workers, bsz, is_train, collate_fn))
        return loaders

    def _make_loader(self, dataset, num_workers, batch_size, is_train, collate_fn):
        if isinstance(dataset, ChainDataset) and len(dataset.datasets) == 1:
            dataset = dataset.datasets[0]
        pin = self.device.type == "cuda"
        collate_fn = getattr(dataset, "collater", None) or collate_fn
        if isinstance(dataset, IterableDataset):
            loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=pin, collate_fn=collate_fn)
            if not is_train:
                return loader  # each rank/worker reads its own shards, once
            try:
                length = len(dataset)
            except TypeError:
                raise ValueError(
                    f"training split {dataset!r} has no known length; set its length (e.g. a sizes file) or use runner: runner_iter"
                ) from None
            steps = length // (get_world_size() * batch_size)
            if steps < 1:
                raise ValueError(
                    f"training split has {length} samples, fewer than world_size x batch_size_train = "
                    f"{get_world_size()} x {batch_size}; lower run.batch_size_train"
                )
            return EpochStreamLoader(loader, dataset, steps, first_pass=self.start_epoch)
        sampler = None
        if self.use_distributed and (is_train or self.use_dist_eval_sampler):
            sampler = DistributedSampler(dataset, shuffle=is_train, num_replicas=get_world_size(), rank=get_rank())
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin,
            sampler=sampler,
            shuffle=sampler is None and is_train,
            collate_fn=collate_fn,
            drop_last=is_train,
        )
        return IterLoader(loader, use_distributed=self.use_distributed) if is_train else loader

    @torch.no_grad()
    def eval_epoch(self, split_name, cur_epoch, skip_reload=False):
        """`run.val_freq: N` validates every N epochs (and after the last); LAVIS validates every epoch."""
        freq = int(self.config.run_cfg.get("val_freq", 1))
        during_training = isinstance(cur_epoch, int) and not self.evaluate_only and split_name in self.valid_splits
        if during_training and freq > 1 and (cur_epoch + 1) % freq and cur_epoch + 1 != self.max_epoch:
            logger.info("skipping %s validation at epoch %d (run.val_freq=%d)", split_name, cur_epoch, freq)
            return None
        return super().eval_epoch(split_name, cur_epoch, skip_reload=skip_reload)

    # ---- checkpoints ------------------------------------------------------------------------
    def checkpoint_path(self, tag) -> Path:
        return Path(self.output_dir) / f"checkpoint_{tag}.safetensors"

    @main_process
    def _save_checkpoint(self, cur_epoch, is_best=False):
        """Trainable tensors, optimizer and scaler state as safetensors, written atomically
        (:mod:`lavis_ext.checkpoints`); LAVIS pickles the lot with ``torch.save`` in place."""
        path = self.checkpoint_path("best" if is_best else cur_epoch)
        save_checkpoint(
            path,
            self.unwrap_dist_model(self.model),
            config=self.config.to_dict(),
            optimizer=self.optimizer,
            scaler=self.scaler,
            epoch=cur_epoch,
        )
        logger.info("saved checkpoint of epoch %s to %s", cur_epoch, path)

    def _load_checkpoint(self, url_or_filename):
        """Resume. LAVIS saves only trainable tensors but loads strictly (RuntimeError: Missing key(s)
        ... "visual_encoder.cls_token"); here the trainable tensors must all be there and nothing else."""
        model = self.unwrap_dist_model(self.model)
        load_trainable(model, url_or_filename, require_all_trainable=True)
        meta = restore_optimizer(self.optimizer, url_or_filename, scaler=self.scaler)
        if "epoch" not in meta:
            raise ValueError(f"checkpoint {url_or_filename} records no epoch; it cannot resume a run")
        self.start_epoch = meta["epoch"] + 1
        logger.info("resumed from %s at epoch %d", url_or_filename, self.start_epoch)

    def _reload_best_model(self, model):
        """LAVIS raises FileNotFoundError on the best checkpoint when no validation score ever beat 0;
        then the current weights are the best we have."""
        best = self.checkpoint_path("best")
        if not best.is_file():
            logger.warning("no %s (validation never improved on 0): testing the current weights", best.name)
            return model
        load_trainable(model, best)
        return model

    # ---- logging ----------------------------------------------------------------------------
    def log_stats(self, stats, split_name):
        super().log_stats(stats, split_name)
        if isinstance(stats, dict) and split_name != "train":
            step = getattr(self.task, "global_step", 0)
            curves = {k: v for k, v in stats.items() if k != "best_epoch"}  # bookkeeping, not a metric
            self.tracker.scalars(split_name, curves, step)

    def train(self):
        report = format_parameter_report(self.unwrap_dist_model(self.model))
        logger.info("parameters:\n%s", report)
        if is_main_process():
            (Path(self.output_dir) / "parameters.txt").write_text(report + "\n")
        try:
            return super().train()
        finally:
            self.tracker.plot()
            self.tracker.close()


# Projects say `runner: runner_base`; from here on that name means our runner.
registry.mapping["runner_name_mapping"]["runner_base_lavis"] = RunnerBase
registry.mapping["runner_name_mapping"]["runner_base"] = RunnerBaseExt

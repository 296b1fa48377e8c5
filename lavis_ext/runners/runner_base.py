"""`runner_base`, fixed for CPU, webdataset splits with a known length, and exact resume.

After `lavis_ext.register()` the registry name ``runner_base`` resolves to :class:`RunnerBaseExt`
(LAVIS's class stays reachable as ``runner_base_lavis``). Each override names what it fixes in
LAVIS 1.0.2; nothing is copied but the ~40-line epoch loop of ``train`` (LAVIS saves only at the end of
an epoch and only "best" when there are validation splits, and has no hook between the two). The steps of
an epoch are the runner's too: :meth:`RunnerBaseExt.train_epoch` runs :class:`~lavis_ext.runners.loop.TrainLoop`
(LAVIS hands them to the task's CUDA-only ``train_epoch``), which asks the task for ``train_step`` only and
keeps the :class:`~lavis_ext.runners.loop.LoopState` that checkpoints record.

Resume, in short (docs/distributed.md has the whole story):

* every ``run.save_every_steps`` optimizer steps and at the end of every epoch, every rank sends its RNG
  states and data position to rank 0, which writes one full-state checkpoint
  (:mod:`lavis_ext.checkpoints`) atomically and then points ``latest`` at it; step checkpoints older
  than the newest ``run.keep_step_checkpoints`` (default 2: the new one and the previous good one) are
  deleted only after that;
* ``run.resume_ckpt_path: X`` or ``run.resume: auto`` (the newest ``<output_dir>/*/latest``, or the
  ``run.job_id`` folder's) loads weights, optimizer, scaler, scheduler and loop counters, puts the
  training loader back at its position by replaying the consumed batches of the current pass (no
  forward/backward, data loading only), then restores this rank's RNG states, so the next sample and
  every random draw are those the uninterrupted run would have made.

Several training datasets are mixed by ``datasets.<name>.sample_ratio`` (LAVIS main's key) or
``run.train_dataset_ratios: {name: ratio}`` (1.0.2's, which only its runner_iter read, and which fails
there with UnboundLocalError, runner_iter.py:250) with :class:`~lavis_ext.runners.loaders.MixedLoader`:
seeded picks and a position that checkpoints carry, instead of LAVIS's stateless ``MultiIterLoader``.
Without ratios LAVIS's grouping stays (map-style datasets concatenated, webdataset splits chained, the
two kinds mixed uniformly), also through :class:`MixedLoader`. An epoch of a mix is the children's
epochs summed (as if concatenated); runner_iter (:mod:`lavis_ext.runners.runner_iter`) counts iterations.
"""
from __future__ import annotations

import datetime
import logging
import os
import re
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from lavis.common.dist_utils import get_rank, get_world_size, is_main_process
from lavis.common.registry import registry
from lavis.runners.runner_base import RunnerBase
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import ChainDataset, DataLoader, DistributedSampler, IterableDataset

from lavis_ext import dist as ext_dist
from lavis_ext.checkpoints import (
    apply_optimizer,
    apply_trainable,
    capture_rng_state,
    first_valid,
    load_trainable,
    optimizer_state,
    rank_rng_state,
    read_checkpoint,
    read_metadata,
    restore_rng_state,
    restore_scheduler,
    resume_candidates,
    save_checkpoint,
    trainable_state,
    write_latest,
)
from lavis_ext.models.strategies import format_parameter_report
from lavis_ext.runners import fsdp
from lavis_ext.runners.compile import compile_towers
from lavis_ext.runners.loaders import EpochStreamLoader, MixedLoader
from lavis_ext.runners.loop import LoopState, TrainLoop

from lavis_ext.runners.tracking import RunTracker
from lavis_ext.precision import resolve_amp_dtype

logger = logging.getLogger(__name__)


_VIT_BLOCK = re.compile(r"^visual_encoder\.(?:blocks|transformer\.resblocks)\.(\d+)\.")


def vit_depth(model) -> int:
    """Number of transformer blocks of the model's ViT (EVA ``blocks`` or CLIP ``transformer.resblocks``)."""
    ids = {int(m.group(1)) for name, _ in model.named_parameters() if (m := _VIT_BLOCK.match(name))}
    return max(ids) + 1 if ids else 0


def vit_layer_id(name: str, depth: int) -> int:
    """0 for the ViT's embeddings, i + 1 for its block i, depth + 1 for everything else (no decay)."""
    match = _VIT_BLOCK.match(name)
    if match:
        return int(match.group(1)) + 1
    if name.startswith("visual_encoder.") and any(k in name for k in ("patch_embed", "pos_embed", "cls_token", "conv1", "class_embedding", "positional_embedding", "ln_pre")):
        return 0
    return depth + 1


OPTIMIZER_IMPLS = ("fused", "foreach", "for_loop")


def _fused_unsupported(params) -> str | None:
    """Why torch's fused AdamW kernel cannot take ``params`` (None when it can)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    devices = set(_get_fused_kernels_supported_devices())
    for param in params:
        if param.device.type not in devices:
            return f"a parameter is on {param.device.type}, fused AdamW runs on {sorted(devices)}"
        if not torch.is_floating_point(param):
            return f"a parameter has dtype {param.dtype}, fused AdamW needs floating point"
    return None


def resolve_optimizer_impl(params, requested: str | None = None) -> str:
    """``run.optimizer_impl``: ``fused`` (one kernel over all tensors), ``foreach`` (batched tensor ops) or
    ``for_loop`` (torch's per-tensor Python loop, its CPU default and what LAVIS runs). Unset means fused where
    torch has the kernel for the parameters' device (CPU and CUDA in torch >= 2.4), else foreach: the same
    AdamW update (within float rounding, ~1e-7 relative), 5x faster per step than the loop on the tiny model."""
    params = list(params)
    if requested is None:
        return "foreach" if _fused_unsupported(params) else "fused"
    if requested not in OPTIMIZER_IMPLS:
        raise ValueError(f"run.optimizer_impl {requested!r}: use one of {', '.join(OPTIMIZER_IMPLS)} (or leave it unset)")
    if requested == "fused" and (why := _fused_unsupported(params)):
        raise ValueError(f"run.optimizer_impl fused: {why}; set run.optimizer_impl: foreach")
    return requested


def _impl_flags(impl: str) -> dict:
    return {"fused": {"fused": True, "foreach": False}, "foreach": {"fused": False, "foreach": True},
            "for_loop": {"fused": False, "foreach": False}}[impl]


def keep_optimizer_impl(optimizer) -> None:
    """Put the built implementation back on every group after ``load_state_dict``, which restores the saved
    groups' ``fused``/``foreach`` flags: a resumed run keeps its ``run.optimizer_impl`` whatever wrote the
    checkpoint (a LAVIS or older one says for_loop). The constructor's choice stays in ``defaults``."""
    for group in optimizer.param_groups:
        for key in ("fused", "foreach"):
            group[key] = optimizer.defaults.get(key)


def build_optimizer(model, run_cfg) -> torch.optim.AdamW:
    """The run's AdamW, built in one place for the plain and the layer-decay cases.

    Groups as LAVIS's ``RunnerBase.optimizer``: no weight decay on biases, norms and 1-d tensors, ``[decay,
    no decay]`` in that order (so optimizer state saved by LAVIS's order still maps). With
    ``run.vit_layer_decay: d`` (the paper's Tables 7-9) ViT block i of L trains at ``lr x d^(L - i)``, the
    patch/position embeddings at ``d^(L + 1)``, everything else at ``lr``: one group per (scale, decay) with
    its ``lr_scale``, which the training loop applies after LAVIS's scheduler (LAVIS has one LR for all).
    The implementation comes from :func:`resolve_optimizer_impl`."""
    decay = float(run_cfg.get("vit_layer_decay") or 1.0)
    weight_decay = float(run_cfg.weight_decay)
    depth = vit_depth(model) if decay != 1.0 else 0
    groups: dict = {}
    if decay == 1.0:
        groups = {(1.0, False): {"params": [], "weight_decay": weight_decay}, (1.0, True): {"params": [], "weight_decay": 0}}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        scale = decay ** (depth + 1 - vit_layer_id(name, depth)) if decay != 1.0 else 1.0
        no_wd = param.ndim < 2 or "bias" in name or "ln" in name or "bn" in name
        group = groups.setdefault(
            (scale, no_wd), {"params": [], "weight_decay": 0.0 if no_wd else weight_decay, "lr_scale": scale}
        )
        group["params"].append(param)
    params = [p for g in groups.values() for p in g["params"]]
    impl = resolve_optimizer_impl(params, run_cfg.get("optimizer_impl"))
    optimizer = torch.optim.AdamW(list(groups.values()), lr=float(run_cfg.init_lr), weight_decay=weight_decay,
                                  betas=(0.9, run_cfg.get("beta2", 0.999)), **_impl_flags(impl))
    logger.info("AdamW (%s) over %d trainable tensors, %d parameters, %d groups%s", impl, len(params),
                sum(p.numel() for p in params), len(groups),
                f"; ViT layer-wise LR decay {decay:.3f} over {depth} blocks" if decay != 1.0 else "")
    return optimizer


@registry.register_runner("runner_base_ext")
class RunnerBaseExt(RunnerBase):
    def __init__(self, cfg, task, model, datasets, job_id, resume_path: str | None = None):
        super().__init__(cfg, task, model, datasets, job_id)
        self.resume_path = resume_path
        self._resume_auto = resume_path is not None and not cfg.run_cfg.get("resume_ckpt_path")
        self._resume_position = None
        self._pending_validation = None
        # LAVIS starts at 0, so a metric that is never positive (image_text_pretrain_ext's negative loss) never
        # made a best checkpoint; the first validation is the best so far
        self.best_agg_metric, self.best_epoch = float("-inf"), 0
        self.tracker = RunTracker(self.output_dir, enabled=is_main_process())
        # the training loop (lavis_ext.runners.loop): the task is asked for train_step only
        self.loop = TrainLoop(cfg.run_cfg, tracker=self.tracker, on_step=self._on_step)
        # ``hook(global_step, tmp_path)`` when a full-state checkpoint is written, before it replaces anything;
        # empty in production (tests install them, as LAVIS_EXT_FAULT_INJECT does below)
        self.save_hooks: list = []
        if os.environ.get(ext_dist.FAULT_ENV):
            self._install_fault_injection()

    # ---- model / device ----------------------------------------------------------------------
    @property
    def model(self):
        """Move once, wrap once, compile the towers once (``run.compile``). LAVIS sets the wrapped model only when the device changes, so on CPU
        it returns None (AttributeError: 'NoneType' object has no attribute 'train', runner_base.py:429),
        and passes `device_ids=[gpu]` for CPU modules (ValueError from DDP)."""
        if self._wrapped_model is None:
            if self._model.device != self.device:
                self._model = self._model.to(self.device)
            if self.use_distributed and fsdp.enabled(self.config.run_cfg):
                self._wrapped_model = fsdp.shard(self._model, self.config.run_cfg, self.device)
            elif self.use_distributed:
                device_ids = [self.device.index] if self.device.type == "cuda" else None
                self._wrapped_model = DDP(self._model, device_ids=device_ids)
            else:
                if fsdp.enabled(self.config.run_cfg):
                    logger.info("run.fsdp with one process: nothing to shard, the model trains as it is")
                self._wrapped_model = self._model
            compile_towers(self._model, self.config.run_cfg.get("compile"))
        return self._wrapped_model

    def unwrap_dist_model(self, model):
        """DDP wraps the model (``.module``); FSDP shards it in place (LAVIS assumes ``.module``)."""
        return model.module if isinstance(model, DDP) else model

    @property
    def _sharded(self) -> bool:
        return getattr(self.unwrap_dist_model(self.model), "fsdp_sharded", False)

    @property
    def optimizer(self):
        """AdamW from :func:`build_optimizer` (LAVIS's groups, ``run.vit_layer_decay``, ``run.optimizer_impl``),
        built once on the unwrapped model, in place of LAVIS's, which always runs torch's per-tensor loop."""
        if self._optimizer is None:
            self._optimizer = build_optimizer(self.unwrap_dist_model(self.model), self.config.run_cfg)
        return self._optimizer

    @property
    def scaler(self):
        """A loss scaler only where it is needed: fp16 autocast on a GPU. LAVIS creates
        a CUDA GradScaler whenever `amp` is on (also for bf16, and on CPU)."""
        if self._scaler is None and self.config.run_cfg.get("amp", False):
            if resolve_amp_dtype(self.config.run_cfg, self.device, self._model) == torch.float16:
                self._scaler = torch.amp.GradScaler(self.device.type)
        return self._scaler

    def setup_output_dir(self):
        """A relative `run.output_dir` is relative to the working directory. LAVIS joins it to the
        library root, which puts runs inside site-packages/lavis. An output folder that cannot be
        created or written fails here, naming it, before any training."""
        output_dir = Path(self.config.run_cfg.output_dir).expanduser().resolve() / self.job_id
        result_dir = output_dir / "result"
        try:
            result_dir.mkdir(parents=True, exist_ok=True)
            probe = output_dir / f".write_test-{os.getpid()}"
            probe.write_text("ok\n")
            probe.unlink()
        except OSError as error:
            raise PermissionError(
                f"output directory {str(output_dir)!r} cannot be created or written ({type(error).__name__}: "
                f"{error}); set run.output_dir to a writable folder (e.g. --options run.output_dir=runs/x) "
                "or fix its permissions"
            ) from error
        # A second runner in one process: KeyError: "Name 'result_dir' already registered." (registry.py:200)
        for key in ("result_dir", "output_dir"):
            registry.mapping["paths"].pop(key, None)
        registry.register_path("result_dir", str(result_dir))
        registry.register_path("output_dir", str(output_dir))
        self.result_dir, self.output_dir = result_dir, output_dir

    def check_free_disk(self) -> None:
        """Fail before training when the output folder's disk cannot hold two checkpoints (the new one is
        written while the previous good one is kept) plus ``run.min_free_disk_mb`` (default 64)."""
        model = self._model  # (self.model would wrap DDP, a collective, on rank 0 alone)
        trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        per_checkpoint = 3 * trainable + (1 << 20)  # weights + two AdamW moments + metadata
        margin = int(float(self.config.run_cfg.get("min_free_disk_mb", 64)) * (1 << 20))
        needed = 2 * per_checkpoint + margin
        free = shutil.disk_usage(self.output_dir).free
        if free < needed:
            raise OSError(
                f"not enough free disk for checkpoints in {str(self.output_dir)!r}: {free / 2**20:.0f} MiB free, "
                f"{needed / 2**20:.0f} MiB needed (2 checkpoints of ~{per_checkpoint / 2**20:.0f} MiB + "
                f"run.min_free_disk_mb={margin >> 20}); free space, point run.output_dir at another disk, "
                "or lower run.min_free_disk_mb"
            )

    # ---- data -------------------------------------------------------------------------------
    @property
    def dataloaders(self) -> dict:
        """LAVIS's loaders, with the training split of several datasets mixed by their sample ratios (module
        docstring); LAVIS would concatenate or chain them. A split other than train given by two datasets
        fails naming them (LAVIS: AssertionError: Do not support multiple val datasets)."""
        if self._dataloaders is not None:
            return self._dataloaders
        for split in {s for splits in self.datasets.values() for s in splits if s != "train"}:
            owners = [name for name, splits in self.datasets.items() if split in splits]
            if len(owners) > 1:
                raise ValueError(
                    f"split {split!r} comes from {len(owners)} datasets ({', '.join(owners)}); metrics are computed on "
                    f"one dataset per split: keep {split!r} in one of them (e.g. drop it from the others' "
                    "build_info) or remove it from run.valid_splits/test_splits"
                )
        mix = self._train_mix()
        if mix is None:
            return super().dataloaders
        names, ratios = mix
        train = {name: self.datasets[name].pop("train") for name in names}
        loaders = super().dataloaders  # the other splits, as LAVIS builds them
        batch = int(self.config.run_cfg.batch_size_train)
        children = [self._make_loader(train[n], self.config.run_cfg.num_workers, batch, True,
                                      getattr(train[n], "collater", None), mixed=True) for n in names]
        loaders["train"] = self._mixed_loader(children, names, ratios)
        self.datasets["train"] = [train[n] for n in names]
        logger.info("training mixes %s", ", ".join(f"{n} (ratio {r:g})" for n, r in zip(names, ratios)))
        return loaders

    def _train_mix(self) -> tuple[list[str], list[float]] | None:
        """(dataset names, ratios) of the training datasets to mix, or None when no ratio is set or only one
        dataset trains.

        Raises:
            ValueError: ratios in both places, ratios for datasets that do not train, or some training
                datasets without one.
        """
        run_ratios = self.config.run_cfg.get("train_dataset_ratios")
        cfg_ratios = {name: d.get("sample_ratio") for name, d in self.config.datasets_cfg.items()
                      if d.get("sample_ratio") is not None}
        if run_ratios and cfg_ratios:
            raise ValueError(
                "sample ratios are given twice (run.train_dataset_ratios and datasets.<name>.sample_ratio); "
                "keep datasets.<name>.sample_ratio"
            )
        ratios = dict(run_ratios or cfg_ratios)
        if not ratios:
            return None
        training = [name for name, splits in self.datasets.items() if "train" in splits]
        unknown = [name for name in ratios if name not in training]
        if unknown:
            raise ValueError(f"sample ratio for {', '.join(unknown)}, which has no train split; datasets that train: "
                             f"{', '.join(training) or 'none'}")
        missing = [name for name in training if name not in ratios]
        if missing:
            raise ValueError(f"training datasets without a sample ratio: {', '.join(missing)}; give each training "
                             f"dataset one (e.g. datasets.{missing[0]}.sample_ratio=1.0)")
        if len(training) < 2:
            return None
        return training, [float(ratios[name]) for name in training]

    def _mixed_loader(self, children, names, ratios=None) -> MixedLoader:
        naturals = [loader.steps_per_epoch for loader in children]  # children: one pass's batches, or None
        natural = sum(naturals) if all(n is not None for n in naturals) else None
        return MixedLoader(children, ratios, names, seed=int(self.config.run_cfg.get("seed", 42)), rank=get_rank(),
                           steps_per_epoch=self._epoch_steps(natural, names))

    def _epoch_steps(self, natural: int | None, what) -> int:
        """Training steps per epoch, from the steps of one pass over the data (None: unknown length)."""
        if natural is None:
            raise ValueError(
                f"training split {what!r} has no known length; set its length (e.g. a sizes file, or "
                "build_info.lengths.train) or use runner: runner_iter"
            )
        return natural

    def _pass_steps(self, natural: int | None) -> int | None:
        """Where an endless (resampled) stream's pass ends: after an epoch's steps."""
        return natural

    def create_loaders(self, datasets, num_workers, batch_sizes, is_trains, collate_fns, dataset_ratios=None):
        """No CUDA prefetch stream (LAVIS's PrefetchLoader creates a CUDA stream and fails on CPU),
        IterableDatasets with a known length become epoch-sized loaders (LAVIS supports them only
        in runner_iter), and LAVIS's (map-style, webdataset) training pair is mixed uniformly by a
        :class:`MixedLoader` (``dataset_ratios`` are handled by :attr:`dataloaders`)."""
        loaders = []
        for dataset, bsz, is_train, collate_fn in zip(datasets, batch_sizes, is_trains, collate_fns):
            if isinstance(dataset, (list, tuple)):
                children = [self._make_loader(d, num_workers, bsz, is_train, collate_fn[i], mixed=True)
                            for i, d in enumerate(dataset)]
                loaders.append(self._mixed_loader(children, [type(d).__name__ for d in dataset]))
            else:
                loaders.append(self._make_loader(dataset, num_workers, bsz, is_train, collate_fn))
        return loaders

    def _make_loader(self, dataset, num_workers, batch_size, is_train, collate_fn, mixed: bool = False):
        """Every loader gets its own generator, so creating an iterator (which draws the workers' base
        seed) never consumes the global torch RNG: validation and resume leave training's RNG alone.
        Map-style training splits always go through a seeded DistributedSampler (1 replica when not
        distributed) instead of LAVIS's IterLoader/RandomSampler, so their order is a function of
        (seed, pass) and resumable. ``mixed``: a child of a :class:`MixedLoader` (its passes are its own,
        its length is not an epoch)."""
        if isinstance(dataset, ChainDataset) and len(dataset.datasets) == 1:
            dataset = dataset.datasets[0]
        pin = self.device.type == "cuda"
        collate_fn = getattr(dataset, "collater", None) or collate_fn
        seed = int(self.config.run_cfg.get("seed", 42))
        generator = torch.Generator().manual_seed(seed + get_rank())
        if isinstance(dataset, IterableDataset):
            loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=pin,
                                collate_fn=collate_fn, generator=generator)
            if not is_train:
                return loader  # each rank/worker reads its own shards, once
            try:
                length = len(dataset)
            except TypeError:
                length = None
            steps = None if length is None else length // (get_world_size() * batch_size)
            if steps is not None and steps < 1:
                raise ValueError(
                    f"training split has {length} samples, fewer than world_size x batch_size_train = "
                    f"{get_world_size()} x {batch_size}; lower run.batch_size_train"
                )
            return self._train_stream(loader, dataset, steps, seed, mixed)
        sampler = None
        if is_train:
            sampler = DistributedSampler(dataset, shuffle=True, num_replicas=get_world_size(), rank=get_rank(), seed=seed)
        elif self.use_distributed and self.use_dist_eval_sampler:
            sampler = DistributedSampler(dataset, shuffle=False, num_replicas=get_world_size(), rank=get_rank())
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin,
            sampler=sampler,
            shuffle=False,
            collate_fn=collate_fn,
            drop_last=is_train,
            generator=generator,
        )
        if not is_train:
            return loader
        return self._train_stream(loader, dataset, len(loader), seed, mixed)

    def _train_stream(self, loader, dataset, natural: int | None, seed: int, mixed: bool) -> EpochStreamLoader:
        """An endless, resumable training stream; ``natural``: batches of one pass (None: unknown)."""
        if isinstance(dataset, ChainDataset) and any(getattr(d, "resampled", False) for d in dataset.datasets):
            raise ValueError(
                f"{', '.join(map(repr, dataset.datasets))}: an endless (resampled) stream chained with others would "
                "never hand over to them; mix them instead: datasets.<name>.sample_ratio for each training dataset"
            )
        endless = getattr(dataset, "resampled", False)
        pass_steps = self._pass_steps(natural) if endless else None
        if endless and pass_steps is None:
            raise ValueError(f"{dataset!r} is an endless stream with no known length; use runner: runner_iter "
                             "(or give it a nominal epoch length: build_info.lengths.train)")
        steps = natural if mixed else self._epoch_steps(natural, dataset)
        return EpochStreamLoader(loader, dataset, steps, first_pass=0 if mixed else self.start_epoch, seed=seed,
                                 rank=get_rank(), pass_steps=pass_steps)

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

    def _save_checkpoint(self, cur_epoch, is_best=False):
        """Trainable tensors, optimizer and scaler state as safetensors, written atomically
        (:mod:`lavis_ext.checkpoints`); LAVIS pickles the lot with ``torch.save`` in place. The epoch
        and step checkpoints that runs resume from are written by :meth:`save_state` (all ranks).
        Called by rank 0, or by every rank under FSDP (the shards are gathered collectively)."""
        path = self.checkpoint_path("best" if is_best else cur_epoch)
        written = self._write_checkpoint(
            path,
            epoch=cur_epoch,
            extra={"best_agg_metric": self.best_agg_metric, "best_epoch": self.best_epoch} if is_best else None,
        )
        if written is not None:
            logger.info("saved checkpoint of epoch %s to %s", cur_epoch, path)

    def _write_checkpoint(self, path, **state):
        """This run's model, config, optimizer and scaler, plus ``state``, into one checkpoint file.
        Rank 0 writes and returns the path; under FSDP every rank first gathers the whole tensors."""
        model, optimizer = self.unwrap_dist_model(self.model), self.optimizer
        if self._sharded:
            model, optimizer = trainable_state(model), optimizer_state(optimizer)  # collectives
        if not is_main_process():
            return None
        return save_checkpoint(path, model, config=self.config.to_dict(), optimizer=optimizer, scaler=self.scaler, **state)

    def _train_loader_position(self):
        loader = self.train_loader
        return loader.state_dict() if hasattr(loader, "state_dict") else None

    def save_state(self, state: LoopState) -> Path | None:
        """A full-state checkpoint at the loop's ``state`` (after step ``state.step`` of ``state.epoch``; a done
        epoch when that is its last). Called on every rank: each contributes its RNG states, data position and
        loop state (its own loss sum); rank 0 writes. ``train_state`` is rank 0's :class:`LoopState` plus the
        runner's own fields (world size, best validation so far)."""
        per_rank = {"rng": capture_rng_state(), "position": self._train_loader_position(), "loop": state.to_dict()}
        gathered = ext_dist.all_gather_object(per_rank)
        path = self.checkpoint_path(state.epoch if state.epoch_done else f"step{state.global_step}")
        train_state = {
            **state.to_dict(), "world_size": get_world_size(),
            "best_agg_metric": self.best_agg_metric, "best_epoch": self.best_epoch,
        }

        def before_replace(tmp):
            for hook in self.save_hooks:
                hook(state.global_step, tmp)

        written = self._write_checkpoint(
            path,
            epoch=state.epoch if state.epoch_done else state.epoch - 1,  # LAVIS's meaning: the last completed epoch
            lr_scheduler=self.lr_scheduler,
            train_state=train_state,
            rank_states=gathered,
            before_replace=before_replace,
        )
        if written is None:  # not rank 0
            return None
        write_latest(self.output_dir, path.name)
        self._prune_step_checkpoints(keep=path)
        logger.info("saved full state at epoch %d step %d/%d (global step %d) to %s",
                    state.epoch, state.step, state.iters_per_epoch, state.global_step, path.name)
        return path

    def _prune_step_checkpoints(self, keep: Path) -> None:
        """Keep the newest ``run.keep_step_checkpoints`` step checkpoints (default 2), deleted only once a
        newer one and ``latest`` are on disk. Epoch checkpoints are kept."""
        limit = max(1, int(self.config.run_cfg.get("keep_step_checkpoints", 2)))
        steps = sorted(Path(self.output_dir).glob("checkpoint_step*.safetensors"),
                       key=lambda p: int(p.name[len("checkpoint_step"):-len(".safetensors")]), reverse=True)
        for old in steps[limit:]:
            if old != keep:
                old.unlink(missing_ok=True)

    def _on_step(self, loop: TrainLoop) -> None:
        """Called by the training loop after each optimizer step (all ranks): step checkpoints every
        ``run.save_every_steps`` (the epoch's last step is saved by the epoch checkpoint)."""
        every = int(self.config.run_cfg.get("save_every_steps", 0) or 0)
        state = loop.state
        if every > 0 and state.global_step % every == 0 and not state.epoch_done:
            self.save_state(loop.snapshot())

    def _install_fault_injection(self) -> None:
        """``LAVIS_EXT_FAULT_INJECT`` (tests that SIGKILL real processes, :func:`lavis_ext.dist.maybe_inject_fault`):
        a loop hook after each optimizer step and a save hook while a checkpoint is written."""
        run_dir = self.output_dir
        self.loop.hooks.append(lambda loop: ext_dist.maybe_inject_fault("step", loop.state.global_step, run_dir))
        self.save_hooks.append(lambda step, tmp: ext_dist.maybe_inject_fault("save", step, run_dir, tmp))

    def _load_checkpoint(self, url_or_filename):
        """Resume. LAVIS saves only trainable tensors but loads strictly (RuntimeError: Missing key(s)
        ... "visual_encoder.cls_token"); here the trainable tensors must all be there and nothing else.
        A full-state checkpoint also restores the scheduler, the loop's :class:`LoopState`, the data position
        and this rank's RNG states (see the module docstring); an epoch-only one resumes at the next epoch."""
        tensors, meta = read_checkpoint(url_or_filename)
        model = self.unwrap_dist_model(self.model)
        apply_trainable(model, tensors, url_or_filename, require_all_trainable=True)
        apply_optimizer(self.optimizer, tensors, meta, url_or_filename, scaler=self.scaler)
        keep_optimizer_impl(self.optimizer)
        if "epoch" not in meta:
            raise ValueError(f"checkpoint {url_or_filename} records no epoch; it cannot resume a run")
        state = meta.get("train_state")
        if state is None:  # a checkpoint written without the training state: epoch granularity
            self.start_epoch = meta["epoch"] + 1
            logger.info("resumed from %s at epoch %d (no step state in it)", url_or_filename, self.start_epoch)
            return
        if meta.get("lr_sched"):
            restore_scheduler(self.lr_scheduler, meta["lr_sched"])
        self.best_agg_metric = state.get("best_agg_metric", float("-inf"))
        self.best_epoch = state.get("best_epoch", 0)
        best = self.checkpoint_path("best")
        if best.is_file():  # validation after this checkpoint may have found a better epoch
            extra = (read_metadata(best).get("extra") or {})
            if extra.get("best_agg_metric", float("-inf")) > self.best_agg_metric:
                self.best_agg_metric, self.best_epoch = extra["best_agg_metric"], extra.get("best_epoch", 0)
        saved_world = int(state.get("world_size", 1))
        entries = meta.get("ranks") or []
        own = entries[get_rank()] if saved_world == get_world_size() and get_rank() < len(entries) else {}
        restored = LoopState.from_checkpoint(state, own)
        self.loop.restore(restored)
        if restored.epoch_done:
            self.start_epoch = restored.epoch + 1
            self._pending_validation = restored.epoch  # it may have been cut short; validation is idempotent
        else:
            self.start_epoch = restored.epoch
            if saved_world != get_world_size():
                raise ValueError(
                    f"checkpoint {url_or_filename} is mid-epoch (step {restored.step} of epoch {restored.epoch}) from a "
                    f"run of {saved_world} processes; this run has {get_world_size()}. Resume it with {saved_world} "
                    "processes, or resume from an epoch checkpoint (checkpoint_<epoch>.safetensors)"
                )
        rank = get_rank()
        positions = meta.get("ranks") or []
        if saved_world == get_world_size() and rank < len(positions):
            position = positions[rank].get("position")
            loader = self.train_loader
            if position is not None and hasattr(loader, "load_state_dict"):
                loader.load_state_dict(position)
                dropped = loader.fast_forward()
                logger.info("data position restored: %d batches replayed (%s)", dropped, position)
            elif position is not None:
                logger.warning("the training loader (%s) cannot restore a data position; it starts a new pass",
                               type(loader).__name__)
            rng = rank_rng_state(tensors, meta, rank)
            if rng is not None:
                restore_rng_state(rng)
        else:
            logger.warning("checkpoint from %d processes, this run has %d: RNG states and data positions not restored",
                           saved_world, get_world_size())
        logger.info("resumed from %s: %s (global step %d)", url_or_filename,
                    f"epoch {restored.epoch} done, next epoch {self.start_epoch}" if restored.epoch_done
                    else f"epoch {restored.epoch}, continuing after step {restored.step}", restored.global_step)

    def _resolve_resume_path(self) -> str | None:
        """The checkpoint to resume from. With ``run.resume: auto`` a corrupt file (checksum) is skipped in
        favour of the previous one; an explicit ``run.resume_ckpt_path`` that is corrupt is an error
        naming the intact alternatives."""
        path = self.resume_path or self.resume_ckpt_path
        if path is None:
            return None
        if not self._resume_auto:
            try:
                read_checkpoint(path)
            except ValueError as error:
                alternatives, _ = first_valid([p for p in resume_candidates(Path(path).parent) if str(p) != str(path)])
                hint = f"; the newest intact one in that folder is {alternatives}" if alternatives else ""
                raise ValueError(f"{error}{hint} (or use run.resume=auto, which skips corrupt files)") from error
        return str(path)

    def _reload_best_model(self, model):
        """LAVIS raises FileNotFoundError on the best checkpoint when there is none (it needed a validation
        score above 0 on split val); then the current weights are the best we have."""
        best = self.checkpoint_path("best")
        if not best.is_file():
            logger.warning("no %s (no validation on split val): testing the current weights", best.name)
            return model
        load_trainable(model, best)
        return model

    # ---- logging ----------------------------------------------------------------------------
    def log_stats(self, stats, split_name):
        super().log_stats(stats, split_name)
        if isinstance(stats, dict) and split_name != "train":
            step = self.loop.state.global_step
            curves = {k: v for k, v in stats.items() if k != "best_epoch"}  # bookkeeping, not a metric
            self.tracker.scalars(split_name, curves, step)

    # ---- the loop -----------------------------------------------------------------------------
    def train(self):
        report = format_parameter_report(self.unwrap_dist_model(self.model))
        logger.info("parameters:\n%s", report)
        problem = None
        if is_main_process():
            (Path(self.output_dir) / "parameters.txt").write_text(report + "\n")
            if not self.evaluate_only:
                try:
                    self.check_free_disk()
                except OSError as error:
                    problem = str(error)
        problem = ext_dist.broadcast_object(problem)  # every rank stops, none waits for a collective
        if problem:
            raise OSError(problem)
        try:
            return self._train_epochs()
        finally:
            self.tracker.plot()
            self.tracker.close()

    def train_epoch(self, epoch):
        """One epoch of :attr:`loop` (LAVIS hands the loop to ``task.train_epoch``, whose loop is CUDA-only);
        the task is asked for ``train_step`` only."""
        self.model.train()
        return self.loop.run_epoch(
            self.task,
            epoch=epoch,
            iters_per_epoch=len(self.train_loader),
            model=self.model,
            data_loader=self.train_loader,
            optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler,
            scaler=self.scaler,
            log_freq=self.log_freq,
            accum_grad_iters=self.accum_grad_iters,
        )

    def _validate(self, cur_epoch) -> None:
        for split_name in self.valid_splits:
            logger.info("Evaluating on %s.", split_name)
            val_log = self.eval_epoch(split_name=split_name, cur_epoch=cur_epoch)
            improved = False
            if val_log is not None and is_main_process():
                assert "agg_metrics" in val_log, "No agg_metrics found in validation log."
                agg_metrics = val_log["agg_metrics"]
                if agg_metrics > self.best_agg_metric and split_name == "val":
                    self.best_epoch, self.best_agg_metric = cur_epoch, agg_metrics
                    improved = True
            if self._sharded:  # every rank takes part in gathering the shards of the best model
                improved = ext_dist.broadcast_object(improved)
            if improved:
                self._save_checkpoint(cur_epoch, is_best=True)
            if val_log is not None and is_main_process():
                val_log.update({"best_epoch": self.best_epoch})
                self.log_stats(val_log, split_name)

    def _train_epochs(self):
        """LAVIS's ``train`` with a full-state checkpoint after every epoch's training (before its
        validation, so a crash during validation loses no training; the resumed run validates that
        epoch first), and mid-epoch resume."""
        start_time = time.time()
        self.log_config()
        if not self.evaluate_only:
            path = self._resolve_resume_path()
            if path is not None:
                self._load_checkpoint(path)
        cur_epoch = self.start_epoch
        if self._pending_validation is not None and not self.evaluate_only:
            cur_epoch = self._pending_validation
            self._validate(cur_epoch)
            self._pending_validation = None
        for cur_epoch in range(self.start_epoch, self.max_epoch):
            if not self.evaluate_only:
                logger.info("Start training")
                train_stats = self.train_epoch(cur_epoch)
                self.log_stats(split_name="train", stats=train_stats)
                self.save_state(self.loop.snapshot())
            self._validate(cur_epoch)
            if self.evaluate_only:
                break
            if dist.is_initialized():
                dist.barrier()
        test_epoch = "best" if len(self.valid_splits) > 0 else min(cur_epoch, self.max_epoch - 1)
        self.evaluate(cur_epoch=test_epoch, skip_reload=self.evaluate_only)
        logger.info("Training time %s", datetime.timedelta(seconds=int(time.time() - start_time)))

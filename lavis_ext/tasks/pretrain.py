"""BLIP-2 pretraining (stage 1: ITC/ITM/ITG; stage 2: language modelling) with our loop and a
held-out validation loss.

LAVIS's ``image_text_pretrain`` runs BaseTask's loop: CUDA-only, fp16-only autocast, no clipping, no
non-finite guard, and its ``evaluation`` does nothing, so a pretraining run has no validation signal
(LAVIS#420). Here the loop is :class:`TaskExtMixin`'s and validation reports the mean loss over the
split (``agg_metrics`` is its negative, so the runner's "best" is the lowest loss).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from lavis.common.registry import registry
from lavis.tasks.image_text_pretrain import ImageTextPretrainTask

from lavis_ext.tasks.base import TaskExtMixin, write_metrics


@registry.register_task("image_text_pretrain_ext")
class PretrainTaskExt(TaskExtMixin, ImageTextPretrainTask):
    def valid_step(self, model, samples):
        batch = samples["image"].size(0)
        return [{"loss_sum": float(model(samples)["loss"]) * batch, "samples": batch}]

    def after_evaluation(self, val_result, split_name, epoch, **kwargs):
        totals = torch.tensor(
            [sum(r["loss_sum"] for r in val_result), sum(r["samples"] for r in val_result)], dtype=torch.float64
        )
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(totals)  # every rank scored its own share of the split
        loss = (totals[0] / totals[1].clamp(min=1)).item()
        metrics = {"loss": loss, "agg_metrics": -loss}
        if not dist.is_initialized() or dist.get_rank() == 0:
            write_metrics(split_name, epoch, {"num_samples": int(totals[1].item())}, metrics)
            print(f"[{split_name} epoch {epoch}] validation loss={loss:.4f}", flush=True)
        return metrics

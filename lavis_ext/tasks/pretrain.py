"""BLIP-2 pretraining (stage 1: ITC/ITM/ITG; stage 2: language modelling) with our loop and a
held-out validation loss.

LAVIS's ``image_text_pretrain`` runs BaseTask's loop: CUDA-only, fp16-only autocast, no clipping, no
non-finite guard, and its ``evaluation`` does nothing, so a pretraining run has no validation signal
(LAVIS#420). Here the loop is the runner's (:mod:`lavis_ext.runners.loop`) and validation reports a loss over the split
(``agg_metrics`` is its negative, so the runner's "best" is the lowest loss).

What the validation loss averages. A held-out split of a caption dataset is read as every evaluation
split is (``caption_eval``: one sample per image with all its ``captions``; LAVIS's KeyError
'text_input' came from treating it as training data). Each evaluation batch of n images becomes
training batches of (image, caption) pairs, caption-major: batch j pairs every image of the evaluation
batch that has a j-th caption with that caption, so, as in training, no batch holds an image twice (a
batch of a single pair joins the previous one: stage 1's contrastive terms need two pairs). Captions go
through the text processor the dataset *trains* with (its train split's; the split's own when the
dataset has no train split), so the text is the text training sees. The reported ``loss`` is::

    sum over those batches of (the model's training loss on the batch x its number of pairs)
    -------------------------------------------------------------------------------------------
                        number of (image, caption) pairs in the split

over all ranks. The batch loss is the model's own: stage 2, the mean over the batch's caption tokens;
stage 1, ITC + ITM + ITG, whose ITC and ITM terms use the batch's other pairs as negatives, so the
number depends on ``batch_size_eval`` (compare runs at the same value). Stage 1's negatives are taken
from this rank's batch only (LAVIS's forward all-gathers them from every rank, a collective that
uneven evaluation shares would deadlock; see :func:`rank_local`). Evaluation draws its random numbers
(ITM's negative sampling) from the torch generator forked from training's and re-seeded with
``run.seed + k`` before the k-th evaluation batch of the rank, so the loss of the same weights is the same
at every validation and training's random stream is untouched.
A split already in training form (``text_input``) is scored batch by batch as it comes.
"""
from __future__ import annotations

import contextlib
import types

import torch
import torch.distributed as dist
from lavis.common.registry import registry
from lavis.models.blip2_models import blip2_qformer
from lavis.tasks.image_text_pretrain import ImageTextPretrainTask

from lavis_ext.tasks.base import TaskExtMixin, model_device, write_metrics


@contextlib.contextmanager
def rank_local(model):
    """Run a stage-1 (``Blip2Qformer``) forward on this rank's batch alone: LAVIS's forward all-gathers
    features and token ids from every rank (``concat_all_gather``, ``all_gather_with_grad``) and offsets the
    ITC targets by ``dist.get_rank()``. A scoped swap of those three module globals of
    ``lavis.models.blip2_models.blip2_qformer`` (LAVIS 1.0.2 is pinned); other models are untouched."""
    if not isinstance(model, blip2_qformer.Blip2Qformer):
        yield
        return
    saved = {name: getattr(blip2_qformer, name) for name in ("concat_all_gather", "all_gather_with_grad", "dist")}
    blip2_qformer.concat_all_gather = blip2_qformer.all_gather_with_grad = lambda tensor: tensor
    blip2_qformer.dist = types.SimpleNamespace(get_rank=lambda: 0)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(blip2_qformer, name, value)


@registry.register_task("image_text_pretrain_ext")
class PretrainTaskExt(TaskExtMixin, ImageTextPretrainTask):
    _pair_text = None  # text processor for the captions of the split being validated
    _eval_batches = 0  # evaluation batches seen in this pass (their RNG seeds)

    def build_datasets(self, cfg):
        """LAVIS's datasets; each non-train split remembers its dataset's train text processor."""
        datasets = super().build_datasets(cfg)
        for splits in datasets.values():
            processor = getattr(splits.get("train"), "text_processor", None)
            for name, dataset in splits.items():
                if name != "train" and processor is not None:
                    dataset.pair_text_processor = processor
        return datasets

    def before_evaluation(self, model, dataset, **kwargs):
        super().before_evaluation(model, dataset, **kwargs)
        self._pair_text = getattr(dataset, "pair_text_processor", None) or getattr(dataset, "text_processor", None)

    @torch.no_grad()
    def evaluation(self, model, data_loader, cuda_enabled=None):
        """The base loop under a forked RNG (seeded per batch by :meth:`valid_step`) and a rank-local
        stage-1 forward."""
        device = model_device(model)
        forked = [device.index or 0] if device.type == "cuda" else []
        self._eval_batches = 0
        with torch.random.fork_rng(devices=forked, device_type="cuda"), rank_local(model):
            return super().evaluation(model, data_loader, cuda_enabled)

    def pair_batches(self, samples) -> list[dict]:
        """An evaluation batch (images with ``captions`` lists) as caption-major training batches (module
        docstring). Raises KeyError naming the keys when the batch has neither captions nor text_input."""
        if "text_input" in samples:
            return [samples]
        if "captions" not in samples:
            raise KeyError(
                f"validation batch has neither 'text_input' nor 'captions' (keys: {sorted(samples)}); "
                "image_text_pretrain_ext validates on caption datasets (wds_caption, json_caption, coco_caption_file)"
            )
        captions, images = samples["captions"], samples["image"]
        text = self._pair_text or (lambda caption: caption)
        batches: list[tuple[list[int], list[str]]] = []
        for j in range(max((len(c) for c in captions), default=0)):
            rows = [i for i, c in enumerate(captions) if len(c) > j]
            texts = [text(captions[i][j]) for i in rows]
            if len(rows) == 1 and batches:
                batches[-1][0].extend(rows)
                batches[-1][1].extend(texts)
            else:
                batches.append((rows, texts))
        ids = samples.get("image_id")
        return [
            {"image": images[rows], "text_input": texts, **({"image_id": [ids[i] for i in rows]} if ids is not None else {})}
            for rows, texts in batches
        ]

    def valid_step(self, model, samples):
        torch.manual_seed(int(self._run_get("seed", 42)) + self._eval_batches)
        self._eval_batches += 1
        results = []
        for batch in self.pair_batches(samples):
            pairs = batch["image"].size(0)
            results.append({"loss_sum": float(model(batch)["loss"]) * pairs, "samples": pairs})
        return results

    def after_evaluation(self, val_result, split_name, epoch, **kwargs):
        totals = torch.tensor(
            [sum(r["loss_sum"] for r in val_result), sum(r["samples"] for r in val_result)], dtype=torch.float64
        )
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(totals)  # every rank scored its own share of the split
        loss = (totals[0] / totals[1].clamp(min=1)).item()
        metrics = {"loss": loss, "agg_metrics": -loss}
        if not dist.is_initialized() or dist.get_rank() == 0:
            write_metrics(split_name, epoch, {"num_pairs": int(totals[1].item())}, metrics)
            print(f"[{split_name} epoch {epoch}] validation loss={loss:.4f} over {int(totals[1].item())} pairs", flush=True)
        return metrics

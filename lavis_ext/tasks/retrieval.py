"""Image-text retrieval with the stage-1 Q-Former: train on ITC/ITM/ITG, evaluate R@1/5/10 both ways.

Training is the stage-1 model's own forward (``blip2_qformer_ext``: ITC + ITM + ITG); ``run.losses``
picks which of the three are optimised (Table 6's ablation: ``[itc, itm]`` against all three). A
dropped loss is weighted by zero rather than skipped, so every parameter still gets a gradient and DDP
needs no ``find_unused_parameters``.

Evaluation follows the paper and LAVIS's ``compute_sim_matrix``: ITC similarity for every image/text
pair (max over the query embeddings), then each image's top ``run.k_test`` texts and each text's top
``k_test`` images are re-scored with ITM, the final score of a re-ranked pair being ITM logit + ITC
similarity; pairs outside the top k score ``-inf``. Recall is :func:`lavis_ext.evaluation.retrieval.retrieval_metrics`
(ties against the model). The split is any caption split in eval mode (one sample per image with all its
``captions``: ``wds_caption``, ``json_caption``, ``coco_caption_file``), so no retrieval-specific dataset.

Distributed, and why it differs from LAVIS. LAVIS encodes the whole split on every rank, splits the ITM rows
evenly and ``all_reduce``-sums score matrices pre-filled with -100. Here each rank encodes only its share
of the images (the loader already splits it), and the small things are gathered: per image its id,
captions, query embeddings, text embeddings and token ids. Every rank orders images by ``image_id`` (so
the global order, and every index, is the same whatever the number of processes), computes the ITC
matrix and the top k, and then scores with ITM exactly the pairs that involve the images *it* encoded:
the large ViT features never leave their rank. The ITM scores of a pair are computed in batches that
depend only on that image's candidate list, and the sparse results are gathered and placed by index, so
1 and N processes give the same matrices and the same recalls. Images that a padded
``DistributedSampler`` hands to two ranks are kept once (the lower rank's copy).
"""
from __future__ import annotations

import logging
import math
from types import MappingProxyType

import torch
import torch.nn.functional as F
from lavis.common.dist_utils import get_rank, is_main_process
from lavis.common.registry import registry
from lavis.tasks.base_task import BaseTask
from tqdm.auto import tqdm

from lavis_ext import dist as ext_dist
from lavis_ext.evaluation.retrieval import index_captions, retrieval_metrics
from lavis_ext.tasks.base import TaskExtMixin, model_device, move_to_device, write_metrics

logger = logging.getLogger(__name__)

#: run.losses name -> the field of the stage-1 model's output (LAVIS's BlipOutput)
LOSS_FIELDS = {"itc": "loss_itc", "itm": "loss_itm", "itg": "loss_lm"}
STAGE1_METHODS = ("forward_image", "forward_text", "compute_itm", "vision_proj", "text_proj", "tokenizer")
ITM_BATCH = 64  # pairs per ITM forward; fixed so a pair's batch never depends on the number of processes
SIM_CHUNK = 64  # images per block of the ITC similarity computation


@registry.register_task("retrieval_ext")
class RetrievalTaskExt(TaskExtMixin, BaseTask):
    """Args: ``k_test`` (candidates re-ranked by ITM per query), ``losses`` (subset of itc, itm, itg)."""

    def __init__(self, k_test: int = 128, losses=("itc", "itm", "itg")):
        super().__init__()
        if int(k_test) < 1:
            raise ValueError(f"run.k_test={k_test}; it must be >= 1 (the paper and LAVIS use 128, or 256 on COCO)")
        losses = [str(name) for name in losses]
        unknown = [name for name in losses if name not in LOSS_FIELDS]
        if unknown or not losses:
            raise ValueError(f"run.losses={losses}: each must be one of {sorted(LOSS_FIELDS)}, and at least one")
        self.k_test = int(k_test)
        self.loss_weights = {name: float(name in losses) for name in LOSS_FIELDS}

    run_options = MappingProxyType({"k_test": 128, "losses": ("itc", "itm", "itg")})

    @classmethod
    def setup_task(cls, cfg):
        return cls(**cls.options(cfg.run_cfg))

    def build_model(self, cfg):
        model = super().build_model(cfg)
        missing = [name for name in STAGE1_METHODS if not hasattr(model, name)]
        if missing:
            raise ValueError(
                f"retrieval_ext needs a stage-1 Q-Former model (model.arch: blip2_qformer_ext); "
                f"{type(model).__name__} ({cfg.model_cfg.get('arch')}) has no {', '.join(missing)}"
            )
        return model

    # ---- training -----------------------------------------------------------------------------
    def train_step(self, model, samples):
        output = model(samples)
        if all(self.loss_weights.values()):
            return output["loss"]
        return sum(weight * output[LOSS_FIELDS[name]] for name, weight in self.loss_weights.items())

    # ---- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluation(self, model, data_loader, cuda_enabled=None):
        """Returns ``{"metrics", "num_images", "num_texts"}`` on every rank (the same numbers)."""
        device = model_device(model)
        records, image_embeds = self._encode_share(model, data_loader, device)
        owners, ordered = merge_shares(ext_dist.all_gather_object(records))
        rank = get_rank()
        captions = [ordered[i]["captions"] for i in range(len(ordered))]
        texts, img2txt, txt2img = index_captions(captions)
        image_feats = torch.cat([r["image_feat"][None] for r in ordered]).to(device)
        text_feats = torch.cat([r["text_feat"] for r in ordered]).to(device)
        text_ids = torch.cat([r["text_ids"] for r in ordered])
        text_atts = torch.cat([r["text_atts"] for r in ordered])
        sims = itc_similarity(image_feats, text_feats).cpu()  # [images, texts]
        top_i2t, top_t2i = top_candidates(sims, self.k_test)
        wanted = pairs_to_rerank(top_i2t, top_t2i, sims.shape)
        mine = [i for i, owner in enumerate(owners) if owner == rank]
        scored = []
        with self._autocast(device, model):
            for i in tqdm(mine, desc="ITM re-rank", disable=not is_main_process(), dynamic_ncols=True, mininterval=1.0):
                candidates = wanted[i].nonzero().flatten()
                embeds = image_embeds[ordered[i]["image_id"]].to(device)
                scores = []
                for start in range(0, len(candidates), ITM_BATCH):
                    chunk = candidates[start : start + ITM_BATCH]
                    scores.append(model.compute_itm(
                        image_inputs=embeds[None].expand(len(chunk), *embeds.shape),
                        text_ids=text_ids[chunk].to(device),
                        text_atts=text_atts[chunk].to(device),
                    ).float().cpu())
                scored.append((i, candidates, torch.cat(scores)))
        itm = torch.full(sims.shape, float("nan"))
        for share in ext_dist.all_gather_object(scored):
            for i, candidates, scores in share:
                itm[i, candidates] = scores
        scores_i2t, scores_t2i = rerank(sims, itm, top_i2t, top_t2i)
        metrics = retrieval_metrics(scores_i2t, scores_t2i, img2txt, txt2img)
        return {"metrics": metrics, "num_images": len(ordered), "num_texts": len(texts), "k_test": self.k_test}

    def _encode_share(self, model, data_loader, device):
        """This rank's images: small per-image records (to gather) and ViT features (kept here, on CPU)."""
        records, image_embeds = [], {}
        for samples in tqdm(data_loader, desc="encode", disable=not is_main_process(), dynamic_ncols=True, mininterval=1.0):
            if "captions" not in samples:
                raise ValueError(
                    "retrieval_ext evaluates caption splits in eval mode (one sample per image with its 'captions'); "
                    f"this split's samples have {sorted(samples)}. Put the split in valid_splits/test_splits of a "
                    "caption builder (wds_caption, json_caption, coco_caption_file)"
                )
            samples = move_to_device(samples, device)
            with self._autocast(device, model):
                query_output, vit = model.forward_image(samples["image"])
                image_feat = F.normalize(model.vision_proj(query_output), dim=-1).float().cpu()
                flat = [c for captions in samples["captions"] for c in captions]
                tokens = model.tokenizer(flat, padding="max_length", truncation=True, max_length=model.max_txt_len,
                                         return_tensors="pt").to(device)
                text_feat = F.normalize(model.text_proj(model.forward_text(tokens)), dim=-1).float().cpu()
            start = 0
            for b, (image_id, captions) in enumerate(zip(samples["image_id"], samples["captions"])):
                end = start + len(captions)
                records.append({
                    "image_id": image_id,
                    "captions": list(captions),
                    "image_feat": image_feat[b],
                    "text_feat": text_feat[start:end],
                    "text_ids": tokens.input_ids[start:end].cpu(),
                    "text_atts": tokens.attention_mask[start:end].cpu(),
                })
                image_embeds.setdefault(image_id, vit[b].cpu())
                start = end
        return records, image_embeds

    def after_evaluation(self, val_result, split_name, epoch, **kwargs):
        metrics = val_result["metrics"]
        if is_main_process():
            record = {k: val_result[k] for k in ("num_images", "num_texts", "k_test")}
            write_metrics(split_name, epoch, record, metrics)
            print(format_retrieval_metrics(split_name, epoch, metrics, record), flush=True)
        return metrics


# ---- the steps, as functions (each is exercised on its own by the tests) ---------------------------
def merge_shares(shares: list[list[dict]]) -> tuple[list[int], list[dict]]:
    """All ranks' image records in one order (sorted by ``image_id``), with the rank that owns each.

    Raises:
        ValueError: one image id with two different caption lists (two images sharing an id), or no images.
    """
    first: dict = {}
    for rank, records in enumerate(shares):
        for record in records:
            key = record["image_id"]
            if key in first:
                if first[key][1]["captions"] != record["captions"]:
                    raise ValueError(
                        f"image_id {key!r} appears twice with different captions; retrieval needs one id per image"
                    )
                continue  # a padded sampler's repeat: the lower rank's copy is kept
            first[key] = (rank, record)
    if not first:
        raise ValueError("the evaluation split has no images")
    keys = sorted(first, key=str)
    return [first[k][0] for k in keys], [first[k][1] for k in keys]


def itc_similarity(image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """``[images, texts]``: for each pair, the best cosine over the image's query embeddings (the
    paper's ITC score; no temperature, as LAVIS ranks with)."""
    blocks = []
    for start in range(0, image_feats.shape[0], SIM_CHUNK):
        block = torch.einsum("iqe,te->iqt", image_feats[start : start + SIM_CHUNK], text_feats)
        blocks.append(block.max(dim=1).values)
    return torch.cat(blocks)


def stable_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the top ``k`` per row; ties go to the lower index (torch.topk leaves them unspecified)."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, : min(k, scores.shape[1])]


def top_candidates(sims: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's top-k texts and each text's top-k images by ITC."""
    return stable_topk(sims, k), stable_topk(sims.t(), k)


def pairs_to_rerank(top_i2t: torch.Tensor, top_t2i: torch.Tensor, shape) -> torch.Tensor:
    """Bool ``[images, texts]``: the pairs either direction re-ranks (each scored once by ITM)."""
    wanted = torch.zeros(shape, dtype=torch.bool)
    wanted.scatter_(1, top_i2t, True)
    wanted.t().scatter_(1, top_t2i, True)
    return wanted


def rerank(sims: torch.Tensor, itm: torch.Tensor, top_i2t: torch.Tensor, top_t2i: torch.Tensor):
    """Final ``(scores_i2t [I, T], scores_t2i [T, I])``: ITM + ITC on each query's top k, ``-inf`` elsewhere.

    Raises:
        RuntimeError: a re-ranked pair without an ITM score (a rank did not report its share).
    """
    combined = itm + sims
    scores_i2t = torch.full(sims.shape, -math.inf)
    scores_i2t.scatter_(1, top_i2t, combined.gather(1, top_i2t))
    combined_t = combined.t()
    scores_t2i = torch.full(combined_t.shape, -math.inf)
    scores_t2i.scatter_(1, top_t2i, combined_t.gather(1, top_t2i))
    if torch.isnan(scores_i2t).any() or torch.isnan(scores_t2i).any():
        raise RuntimeError("a re-ranked image/text pair has no ITM score; every rank must report the pairs of its images")
    return scores_i2t, scores_t2i


def format_retrieval_metrics(split_name, epoch, metrics, record) -> str:
    txt = "  ".join(f"R@{k}={metrics[f'txt_r{k}']:.2f}" for k in (1, 5, 10))
    img = "  ".join(f"R@{k}={metrics[f'img_r{k}']:.2f}" for k in (1, 5, 10))
    return (
        f"[{split_name} epoch {epoch}] {record['num_images']} images, {record['num_texts']} texts, k_test={record['k_test']}\n"
        f"[{split_name} epoch {epoch}] image->text {txt}\n"
        f"[{split_name} epoch {epoch}] text->image {img}  mean recall={metrics['r_mean']:.2f}"
    )

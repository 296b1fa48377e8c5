"""Captioning scored against the evaluation split's own references (no downloaded COCO ground truth).

LAVIS's CaptionTask downloads Karpathy-COCO ground truth (URLError offline), requires integer COCO
image ids, and runs SPICE, which downloads Stanford CoreNLP. Here each eval batch carries its
references (`samples["captions"]`); rank 0 merges all ranks' results, scores them with
:func:`lavis_ext.evaluation.evaluate_captions`, and writes the result and metrics JSON files into
the run's directories.

The result file is ``[{"image_id", "caption"}]`` with each image id as its annotation file has it (COCO's
integers for ``coco_caption_file``, from the dataset's ``source_ids``; the string id otherwise), so
``pycocotools``' ``COCO(gt).loadRes(result_file)`` accepts it as LAVIS's COCO evaluation does.
"""
from __future__ import annotations

import json
import logging
import os
from types import MappingProxyType

from lavis.common.dist_utils import is_main_process, main_process
from lavis.common.registry import registry
from lavis.tasks.captioning import CaptionTask

from lavis_ext.datasets.annotations import fit_image_sizes
from lavis_ext.tasks.base import TaskExtMixin, write_metrics

logger = logging.getLogger(__name__)


@registry.register_task("captioning_ext")
class CaptionTaskExt(TaskExtMixin, CaptionTask):
    def __init__(self, num_beams, max_len, min_len, evaluate, report_metric=True, constant_baseline=True):
        super().__init__(num_beams, max_len, min_len, evaluate, report_metric)
        self.constant_baseline = constant_baseline
        self._baselines: dict[str, tuple[str, float]] = {}  # split -> best constant caption (refs never change)
        self._source_image_ids: dict[str, object] = {}  # the evaluated split's string id -> its annotation file's

    def before_evaluation(self, model, dataset, **kwargs):
        super().before_evaluation(model, dataset, **kwargs)
        self._source_image_ids = (getattr(dataset, "source_ids", None) or {}).get("image_id", {})

    run_options = MappingProxyType(
        {"num_beams": 5, "max_len": 30, "min_len": 1, "report_metric": True, "constant_baseline": True}
    )

    @classmethod
    def setup_task(cls, cfg):
        return cls(evaluate=cfg.run_cfg.get("evaluate", False), **cls.options(cfg.run_cfg))

    def build_datasets(self, cfg):
        fit_image_sizes(cfg)  # image_size: null = the model's; a different size fails before any work
        return super().build_datasets(cfg)

    def valid_step(self, model, samples):
        captions = model.generate(
            samples,
            use_nucleus_sampling=False,
            num_beams=self.num_beams,
            max_length=self.max_len,
            min_length=self.min_len,
        )
        refs = samples.get("captions") or [None] * len(captions)
        return [
            {"image_id": str(image_id), "caption": caption, "references": ref}
            for caption, image_id, ref in zip(captions, samples["image_id"], refs)
        ]

    def after_evaluation(self, val_result, split_name, epoch, **kwargs):
        result_file = self.save_result(
            result=val_result,
            result_dir=registry.get_path("result_dir"),
            filename=f"{split_name}_epoch{epoch}",
            remove_duplicate="image_id",
        )
        if not self.report_metric:
            if is_main_process():
                with open(result_file) as f:
                    self._write_results(result_file, json.load(f))
            return {"agg_metrics": 0.0}
        return self._report_metrics(result_file, split_name, epoch)

    def _write_results(self, path, merged) -> None:
        """The result file in COCO's ``[{image_id, caption}]`` shape, ids as the annotation file has them (the
        references the results carried are the dataset's own)."""
        ids = self._source_image_ids
        with open(path, "w") as f:
            json.dump([{"image_id": ids.get(r["image_id"], r["image_id"]), "caption": r["caption"]} for r in merged], f)

    @main_process
    def _report_metrics(self, eval_result_file, split_name, epoch="best"):
        from lavis_ext.evaluation import best_constant_caption, evaluate_captions

        with open(eval_result_file) as f:
            merged = json.load(f)
        predictions = {r["image_id"]: r["caption"] for r in merged}
        references = {r["image_id"]: r["references"] for r in merged if r.get("references")}
        if len(references) != len(predictions):
            raise ValueError(
                f"{len(predictions) - len(references)} {split_name} samples carry no reference captions; "
                "captioning_ext scores against the dataset's own references (field 'captions')"
            )
        self._write_results(eval_result_file, merged)
        work_dir = os.path.join(registry.get_path("result_dir"), "scoring")
        os.makedirs(work_dir, exist_ok=True)
        metrics = evaluate_captions(predictions, references, work_dir=work_dir)
        skipped = metrics.pop("skipped", {})
        if self.constant_baseline:
            if split_name not in self._baselines:
                self._baselines[split_name] = best_constant_caption(references, work_dir=work_dir)
            caption, cider = self._baselines[split_name]
            metrics["constant_baseline_CIDEr"] = cider
            metrics["constant_baseline_caption"] = caption
        metrics["agg_metrics"] = metrics["CIDEr"] + metrics["Bleu_4"]
        write_metrics(split_name, epoch, {"num_images": len(predictions), "skipped": skipped}, metrics)
        print(format_caption_metrics(split_name, epoch, metrics, skipped), flush=True)
        return metrics


def format_caption_metrics(split_name, epoch, metrics, skipped) -> str:
    keys = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE"]
    parts = [f"{k}={metrics[k]:.4f}" for k in keys if k in metrics]
    lines = [f"[{split_name} epoch {epoch}] " + "  ".join(parts)]
    if "constant_baseline_CIDEr" in metrics:
        lines.append(
            f"[{split_name} epoch {epoch}] best constant caption {metrics['constant_baseline_caption']!r}: "
            f"CIDEr={metrics['constant_baseline_CIDEr']:.4f}"
        )
    for name, reason in skipped.items():
        lines.append(f"[{split_name} epoch {epoch}] {name} skipped: {reason}")
    return "\n".join(lines)

"""Open-ended VQA scored with the VQA accuracy (LAVIS's port of the official evaluation).

LAVIS's VQATask computes metrics only from VQAv2 question/annotation files, so on any other data
its metrics are `{}` and a validation split fails (AssertionError: No agg_metrics found). Here the
annotator answers travel with each batch (`samples["answers"]`), the prompt is applied by the
dataset (the same at training and inference), and rank 0 scores the merged results.
"""
from __future__ import annotations

import json
import logging

from lavis.common.dist_utils import main_process
from lavis.common.registry import registry
from lavis.tasks.vqa import VQATask

from lavis_ext.tasks.base import TaskExtMixin, write_metrics

logger = logging.getLogger(__name__)


@registry.register_task("vqa_ext")
class VQATaskExt(TaskExtMixin, VQATask):
    def __init__(self, num_beams, max_len, min_len, evaluate, prompt="", length_penalty=-1.0):
        super().__init__(
            num_beams=num_beams,
            max_len=max_len,
            min_len=min_len,
            evaluate=evaluate,
            num_ans_candidates=1,
            inference_method="generate",
            prompt=prompt,
        )
        self.length_penalty = length_penalty

    @classmethod
    def setup_task(cls, cfg):
        run_cfg = cfg.run_cfg
        return cls(
            num_beams=run_cfg.get("num_beams", 5),
            max_len=run_cfg.get("max_len", 10),
            min_len=run_cfg.get("min_len", 1),
            evaluate=run_cfg.get("evaluate", False),
            prompt=run_cfg.get("prompt", ""),
            length_penalty=run_cfg.get("length_penalty", -1.0),
        )

    def build_datasets(self, cfg):
        # LAVIS's VQATask.build_datasets looks for COCO-format question files; ours need none.
        return super(VQATask, self).build_datasets(cfg)

    def valid_step(self, model, samples):
        answers = model.predict_answers(
            samples=samples,
            inference_method="generate",
            num_beams=self.num_beams,
            max_len=self.max_len,
            min_len=self.min_len,
            prompt=self.prompt,
            length_penalty=self.length_penalty,
        )
        keys = ("answers", "question_type", "answer_type")
        return [
            {"question_id": str(qid), "answer": answer, **{k: samples[k][i] for k in keys if k in samples}}
            for i, (qid, answer) in enumerate(zip(samples["question_id"], answers))
        ]

    def after_evaluation(self, val_result, split_name, epoch, **kwargs):
        result_file = self.save_result(
            val_result,
            result_dir=registry.get_path("result_dir"),
            filename=f"{split_name}_vqa_result_epoch{epoch}",
            remove_duplicate="question_id",
        )
        return self._report_metrics(result_file, split_name, epoch)

    @main_process
    def _report_metrics(self, result_file, split_name, epoch="best"):
        from lavis_ext.evaluation.vqa import vqa_accuracy

        with open(result_file) as f:
            merged = json.load(f)
        predictions = {r["question_id"]: r["answer"] for r in merged}
        ground_truths = {
            r["question_id"]: {
                "answers": r["answers"],
                "question_type": r.get("question_type", "all"),
                "answer_type": r.get("answer_type", "all"),
            }
            for r in merged
        }
        metrics = vqa_accuracy(predictions, ground_truths)
        metrics["agg_metrics"] = metrics["overall"]
        with open(result_file, "w") as f:  # EvalAI-style shape: [{question_id, answer}]
            json.dump([{"question_id": r["question_id"], "answer": r["answer"]} for r in merged], f)
        write_metrics(split_name, epoch, {"num_questions": len(merged)}, metrics)
        per_type = "  ".join(f"{k}={v:.2f}" for k, v in sorted(metrics["per_answer_type"].items()))
        print(f"[{split_name} epoch {epoch}] VQA accuracy={metrics['overall']:.2f}  {per_type}", flush=True)
        return {"agg_metrics": metrics["overall"], "overall": metrics["overall"],
                **{f"acc_{k}": v for k, v in metrics["per_answer_type"].items()}}

"""Open-ended VQA scored with the official VQA accuracy (LAVIS's port of the official evaluation).

LAVIS's VQATask computes metrics only from VQAv2 question/annotation files, so on any other data
its metrics are `{}` and a validation split fails (AssertionError: No agg_metrics found). Here the
annotator answers travel with each batch (`samples["answers"]`), the prompt is applied by the
dataset (the same at training and inference), and rank 0 scores the merged results with
:func:`lavis_ext.evaluation.vqa.vqa_accuracy`.

The result file is ``[{"question_id", "answer"}]`` with each question id as its annotation file has it (VQAv2's
integers for ``vqa_files``, from the dataset's ``source_ids``; the string id otherwise, e.g. GQA's), so the official
VQA API's ``VQA(ann, ques).loadRes(result_file, ques)`` accepts it.

A split without answers (VQAv2 test-dev / test-std through the ``vqa_files`` builder) is not scored:
its predictions are written as an EvalAI submission file, ``result/<split>_evalai_submission.json``
(``[{"question_id": int, "answer": str}]``). LAVIS 1.0.2 has no such path (its ``_save_result_leaderboard``
exists only for A-OKVQA).

Result merging is linear: LAVIS's ``save_result`` removes duplicates with a list lookup per result,
quadratic in the split size (hours for VQAv2 val's 214k questions); :func:`save_merged_result` uses a set.
"""
from __future__ import annotations

import json
import logging
import os
from types import MappingProxyType

from lavis.common.dist_utils import (
    get_rank,
    get_world_size,
    is_dist_avail_and_initialized,
    is_main_process,
    main_process,
)
from lavis.common.registry import registry
from lavis.tasks.vqa import VQATask

from lavis_ext.datasets.annotations import fit_image_sizes
from lavis_ext.tasks.base import TaskExtMixin, write_metrics

logger = logging.getLogger(__name__)


def save_merged_result(result: list, result_dir: str, filename: str, remove_duplicate: str = "") -> str:
    """LAVIS's ``BaseTask.save_result`` (every rank writes its part, rank 0 merges them into ``<filename>.json``,
    keeping the first result per ``remove_duplicate`` key), with duplicates found through a set."""
    import torch.distributed as dist

    part = os.path.join(result_dir, f"{filename}_rank{get_rank()}.json")
    final = os.path.join(result_dir, f"{filename}.json")
    with open(part, "w") as f:
        json.dump(result, f)
    if is_dist_avail_and_initialized():
        dist.barrier()
    if is_main_process():
        merged, seen = [], set()
        for rank in range(get_world_size()):
            with open(os.path.join(result_dir, f"{filename}_rank{rank}.json")) as f:
                for res in json.load(f):
                    if remove_duplicate:
                        key = res[remove_duplicate]
                        if key in seen:
                            continue
                        seen.add(key)
                    merged.append(res)
        with open(final, "w") as f:
            json.dump(merged, f)
        print(f"result file saved to {final}", flush=True)
    return final


@registry.register_task("vqa_ext")
class VQATaskExt(TaskExtMixin, VQATask):
    result_name = "vqa_result"

    # no `prompt`: the dataset applies the question prompt (datasets.<name>.prompt), once, at training and
    # evaluation alike; LAVIS's run.prompt would format the prompted question a second time
    run_options = MappingProxyType({"num_beams": 5, "max_len": 10, "min_len": 1, "length_penalty": -1.0})

    def __init__(self, num_beams, max_len, min_len, evaluate, length_penalty=-1.0):
        super().__init__(
            num_beams=num_beams,
            max_len=max_len,
            min_len=min_len,
            evaluate=evaluate,
            num_ans_candidates=1,
            inference_method="generate",
            prompt="",
        )
        self.length_penalty = length_penalty
        self._source_question_ids: dict[str, object] = {}  # the evaluated split's string id -> its annotation file's

    def before_evaluation(self, model, dataset, **kwargs):
        super().before_evaluation(model, dataset, **kwargs)
        self._source_question_ids = (getattr(dataset, "source_ids", None) or {}).get("question_id", {})

    @classmethod
    def setup_task(cls, cfg):
        return cls(evaluate=cfg.run_cfg.get("evaluate", False), **cls.options(cfg.run_cfg))

    def build_datasets(self, cfg):
        # LAVIS's VQATask.build_datasets looks for COCO-format question files; ours need none.
        fit_image_sizes(cfg)  # image_size: null = the model's; a different size fails before any work
        return super(VQATask, self).build_datasets(cfg)

    @staticmethod
    def save_result(result, result_dir, filename, remove_duplicate=""):
        return save_merged_result(result, result_dir, filename, remove_duplicate)

    def valid_step(self, model, samples):
        answers = model.predict_answers(
            samples=samples,
            inference_method="generate",
            num_beams=self.num_beams,
            max_len=self.max_len,
            min_len=self.min_len,
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
            filename=f"{split_name}_{self.result_name}_epoch{epoch}",
            remove_duplicate="question_id",
        )
        return self._report_metrics(result_file, split_name, epoch)

    @main_process
    def _report_metrics(self, result_file, split_name, epoch="best"):
        with open(result_file) as f:
            merged = json.load(f)
        answered = [bool(r.get("answers")) for r in merged]
        # The result file keeps the EvalAI shape [{question_id, answer}], ids as the annotation file has them (the
        # answers the results carried are the dataset's).
        ids = self._source_question_ids
        with open(result_file, "w") as f:
            json.dump([{"question_id": ids.get(r["question_id"], r["question_id"]), "answer": r["answer"]}
                       for r in merged], f)
        if merged and not any(answered):
            return self._write_submission(merged, split_name, epoch)
        if not all(answered):
            missing = [r["question_id"] for r, ok in zip(merged, answered) if not ok]
            raise ValueError(
                f"{len(missing)} of {len(merged)} {split_name} questions have no ground-truth answers (e.g. "
                f"{missing[:5]}); a split is either scored (all answered) or written as a submission (none answered)"
            )
        return self._score(merged, split_name, epoch)

    metric_name = "VQA accuracy"

    def _accuracy(self, predictions, ground_truths) -> dict:
        from lavis_ext.evaluation.vqa import vqa_accuracy

        return vqa_accuracy(predictions, ground_truths)

    def _score(self, merged, split_name, epoch) -> dict:
        predictions = {r["question_id"]: r["answer"] for r in merged}
        ground_truths = {
            r["question_id"]: {
                "answers": r["answers"],
                "question_type": r.get("question_type", "all"),
                "answer_type": r.get("answer_type", "all"),
            }
            for r in merged
        }
        metrics = self._accuracy(predictions, ground_truths)
        metrics["agg_metrics"] = metrics["overall"]
        write_metrics(split_name, epoch, {"num_questions": len(merged)}, metrics)
        per_type = "  ".join(f"{k}={v:.2f}" for k, v in sorted(metrics["per_answer_type"].items()))
        print(f"[{split_name} epoch {epoch}] {self.metric_name}={metrics['overall']:.2f}  {per_type}", flush=True)
        return {"agg_metrics": metrics["overall"], "overall": metrics["overall"],
                **{f"acc_{k}": v for k, v in metrics["per_answer_type"].items()}}

    def _write_submission(self, merged, split_name, epoch) -> dict:
        """No answers in this split (a test split): write the leaderboard file instead of scoring."""
        from lavis_ext.evaluation.vqa import write_vqa_submission

        path = write_vqa_submission(
            {r["question_id"]: r["answer"] for r in merged},
            os.path.join(registry.get_path("result_dir"), f"{split_name}_evalai_submission.json"),
        )
        return self._submitted(path, len(merged), split_name, epoch, "the VQA Challenge on EvalAI")

    @staticmethod
    def _submitted(path, count, split_name, epoch, where) -> dict:
        write_metrics(split_name, epoch, {"num_questions": count, "submission_file": str(path)}, {})
        print(f"[{split_name} epoch {epoch}] no ground-truth answers in this split: {count} predictions written to "
              f"{path} for {where}; not scored here", flush=True)
        logger.warning("split %s has no answers: agg_metrics is a 0.0 placeholder (do not validate on it)", split_name)
        return {"agg_metrics": 0.0, "submission_file": str(path)}

"""GQA scored by exact match (:func:`lavis_ext.evaluation.vqa.gqa_accuracy`), for ``evaluate.py`` and validation.

GQA has one answer per question, so the VQA accuracy does not apply (a single answer scores 0 under its
leave-one-out average). Same generation, result merging and file layout as ``vqa_ext``
(``result/<split>_gqa_result_epoch<e>.json`` as ``[{"question_id", "answer"}]``, ``<split>_epoch<e>_metrics.json``),
with metrics ``overall`` (the paper's GQA number), ``per_answer_type`` (open / binary) and ``per_question_type``
(GQA's structural types) when the data carry them (the ``gqa_files`` builder does).

LAVIS's ``gqa`` task normalises the prediction only for generated answers and calls a
``_save_result_leaderboard`` it does not define on splits without answers; here a split without answers gets
a GQA submission file, ``result/<split>_gqa_submission.json`` (``[{"questionId", "prediction"}]``).
"""
from __future__ import annotations

import os

from lavis.common.registry import registry

from lavis_ext.tasks.vqa import VQATaskExt


@registry.register_task("gqa_ext")
class GQATaskExt(VQATaskExt):
    result_name = "gqa_result"

    metric_name = "GQA accuracy (exact match)"

    def _accuracy(self, predictions, ground_truths) -> dict:
        from lavis_ext.evaluation.vqa import gqa_accuracy

        return gqa_accuracy(predictions, ground_truths)

    def _write_submission(self, merged, split_name, epoch) -> dict:
        from lavis_ext.evaluation.vqa import write_gqa_submission

        path = write_gqa_submission(
            {r["question_id"]: r["answer"] for r in merged},
            os.path.join(registry.get_path("result_dir"), f"{split_name}_gqa_submission.json"),
        )
        return self._submitted(path, len(merged), split_name, epoch, "the GQA challenge")

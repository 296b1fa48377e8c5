"""Score a result file against an annotation file, the way our tasks score, and save the metrics.

For results produced anywhere (this repo, LAVIS, Hugging Face inference, another codebase)::

    python -m lavis_ext.evaluation.score captions --results R.json --annotations A.json [--out M.json]
    python -m lavis_ext.evaluation.score vqa --results R.json --annotations A.json [--questions Q.json]
    python -m lavis_ext.evaluation.score gqa --results R.json --annotations testdev_balanced_questions.json
    lavis-ext score ...                      (the same)

Results: captions ``[{"image_id", "caption"}]``; VQA/GQA ``[{"question_id", "answer"}]`` (also GQA's
``[{"questionId", "prediction"}]`` or ``{question_id: answer}``). Annotations: captions in COCO format
(``captions_val2014.json``, ``coco_karpathy_test_gt.json``) or our ``json_caption`` records (JSON or JSONL,
LAVIS's ``coco_karpathy_test.json`` too); VQA as a VQAv2 / OK-VQA annotation file (``--questions`` optional: its
ids are checked against the annotations) or our ``json_vqa`` records; GQA as a GQA question file or ``json_vqa``
records with one answer. Ids are matched as strings; caption results keyed by image path (Karpathy's
``val2014/COCO_val2014_000000391895.jpg``) also match a COCO file's image ids, through its file names or the
number that ends the path (:func:`match_caption_ids`). Every annotated id needs exactly one result, and every result
an annotation (an error names examples); GQA question files with unbalanced questions are scored on the balanced
ones only, as GQA's ``eval.py`` does.

The metrics are printed and written as JSON to ``--out`` (default: ``<results>_metrics.json`` next to the
results). Caption scoring needs Java; ``--metrics`` picks metrics (e.g. ``BLEU CIDEr`` without METEOR's JVM).
VQA ``--mode simplified`` reports the non-comparable ``min(#matches/3, 1)`` (labelled so in the output).
"""
from __future__ import annotations

import argparse
import json
import posixpath
import re
import sys
from pathlib import Path

from lavis_ext.evaluation import files


def score_captions(results, annotations, *, metrics=None, work_dir=None, spice_lib_dir=None) -> dict:
    """Caption metrics of a result file against an annotation file.

    Returns:
        ``{"task", "results", "annotations", "num_images", "metrics", "skipped"}``.

    Raises:
        FileNotFoundError, ValueError: unreadable files, ids that do not match (see :func:`evaluate_captions`).
        RuntimeError: Java is missing or a scorer failed.
    """
    from lavis_ext.evaluation.caption_metrics import METRICS, evaluate_captions

    predictions = files.read_caption_results(results)
    references = files.read_caption_references(annotations)
    predictions, matched = match_caption_ids(predictions, references, files.read_caption_image_names(annotations))
    _check_overlap(predictions, references, "image_id", results, annotations)
    scores = evaluate_captions(predictions, references, metrics=metrics or METRICS, work_dir=work_dir,
                               spice_lib_dir=spice_lib_dir)
    skipped = scores.pop("skipped", {})
    report = {"task": "captions", "results": str(results), "annotations": str(annotations),
              "num_images": len(references), "metrics": scores, "skipped": skipped}
    if matched:
        report["ids_matched_by_file_name"] = matched
    return report


def match_caption_ids(predictions: dict, references: dict, names: dict) -> tuple[dict, int]:
    """Result ids that are not reference ids, matched to one through image file names.

    Karpathy-split results name images by path (``val2014/COCO_val2014_000000391895.jpg``: LAVIS's
    ``coco_karpathy_test.json`` records, ``captioning_ext`` on ``json_caption``), COCO-format ground truth
    (``coco_karpathy_test_gt.json``, ``captions_val2014.json``) by image id. A result id matches a reference id
    through, in order: a reference's file name (whole, or its last path part); the number that ends the file
    name, COCO's image id (``...000000391895.jpg`` -> ``391895``); and, for integer result ids against
    references keyed by path, the number that ends a reference's path. Ids that match nothing are kept as they
    are, so the id check names them.

    Args:
        predictions: ``{result id: caption}``.
        references: ``{reference id: [captions]}``.
        names: ``{reference id: image file name}`` (:func:`files.read_caption_image_names`).

    Returns:
        The predictions re-keyed, and how many ids were matched through file names.

    Raises:
        ValueError: two results match the same reference id.
    """
    def number(name: str) -> str | None:
        digits = re.search(r"(\d+)$", posixpath.splitext(posixpath.basename(name))[0])
        return str(int(digits.group(1))) if digits else None

    by_name: dict[str, str | None] = {}
    by_number: dict[str, str | None] = {}
    for ref, name in [*names.items(), *((k, k) for k in references if not k.isdigit())]:
        if ref not in references:
            continue
        for alias in {name, posixpath.basename(name)}:
            by_name[alias] = ref if by_name.get(alias, ref) == ref else None  # None: ambiguous
        if not ref.isdigit() and number(name) is not None:
            n = number(name)
            by_number[n] = ref if by_number.get(n, ref) == ref else None
    out: dict = {}
    source: dict = {}
    matched = 0
    for key, caption in predictions.items():
        target = key
        if key not in references:
            base = posixpath.basename(key)
            n = number(key)
            for candidate in (by_name.get(key), by_name.get(base), n if n in references else None,
                              by_number.get(key) if key.isdigit() else None):
                if candidate is not None:
                    target = candidate
                    matched += 1
                    break
        if target in out:
            raise ValueError(
                f"results {source[target]!r} and {key!r} both name image {target!r} of the annotations; "
                "keep one caption per image"
            )
        out[target] = caption
        source[target] = key
    return out, matched


def score_vqa(results, annotations, *, questions=None, mode="official") -> dict:
    """VQA accuracy of a result file against VQAv2-style annotations (or our ``json_vqa`` records).

    Returns:
        ``{"task", "results", "annotations", "num_questions", "mode", "metrics"}`` where ``metrics`` is
        :func:`vqa_accuracy`'s output.
    """
    from lavis_ext.evaluation.vqa import vqa_accuracy

    predictions = files.read_vqa_results(results)
    records = _vqa_ground_truth(annotations, questions)
    ground_truths = {str(r["question_id"]): r for r in records}
    _check_overlap(predictions, ground_truths, "question_id", results, annotations)
    metrics = vqa_accuracy(predictions, ground_truths, mode=mode)
    return {"task": "vqa", "results": str(results), "annotations": str(annotations),
            "num_questions": len(ground_truths), "mode": mode, "metrics": metrics}


def score_gqa(results, annotations) -> dict:
    """GQA exact match of a result file against a GQA question file (or ``json_vqa`` records).

    Returns:
        ``{"task", "results", "annotations", "num_questions", "metrics"}`` (plus ``"unbalanced_left_out"``).
    """
    from lavis_ext.evaluation.vqa import gqa_accuracy

    predictions = files.read_vqa_results(results)
    data = files.read_json_or_jsonl(annotations)
    left_out = 0
    if isinstance(data, dict):
        records = files.read_gqa_questions(annotations)
        unbalanced = {r["question_id"] for r in records if r["is_balanced"] is False}
        if unbalanced:
            left_out = len(unbalanced)
            records = [r for r in records if r["question_id"] not in unbalanced]
            predictions = {k: v for k, v in predictions.items() if k not in unbalanced}
    else:
        records = files.read_vqa_records(annotations)
    unanswered = [r["question_id"] for r in records if not r["answers"]]
    if unanswered:
        raise ValueError(f"{annotations}: {len(unanswered)} questions have no answer (e.g. {unanswered[:5]}); "
                         "a split without answers cannot be scored here (submit it to the GQA challenge)")
    ground_truths = {str(r["question_id"]): r for r in records}
    _check_overlap(predictions, ground_truths, "question_id", results, annotations)
    out = {"task": "gqa", "results": str(results), "annotations": str(annotations),
           "num_questions": len(ground_truths), "metrics": gqa_accuracy(predictions, ground_truths)}
    if left_out:
        out["unbalanced_left_out"] = left_out
    return out


def _vqa_ground_truth(annotations, questions) -> list[dict]:
    data = files.read_json_or_jsonl(annotations)
    if isinstance(data, dict) and "annotations" in data:
        if questions is not None:
            return files.read_vqa_files(questions, annotations).records
        records = []
        for i, ann in enumerate(data["annotations"]):
            if not isinstance(ann, dict) or "question_id" not in ann or "answers" not in ann:
                raise ValueError(f"{annotations} annotations[{i}]: an annotation needs 'question_id' and 'answers'")
            records.append({"question_id": ann["question_id"], "answers": ann["answers"],
                            "question_type": ann.get("question_type"), "answer_type": ann.get("answer_type")})
        return records
    if questions is not None:
        raise ValueError(f"--questions goes with a VQAv2 annotation file; {annotations} is not one")
    return files.read_vqa_records(annotations)


def _check_overlap(predictions: dict, truth: dict, what: str, results, annotations) -> None:
    """A clearer message than the scorers' when the two files use different kinds of ids."""
    if predictions and truth and not set(predictions) & set(truth):
        raise ValueError(
            f"no {what} of {results} is in {annotations}: results have ids like {next(iter(predictions))!r}, "
            f"annotations like {next(iter(truth))!r}; both files must use the same ids"
        )


def format_report(report: dict) -> str:
    """Human-readable lines for a report of :func:`score_captions` / :func:`score_vqa` / :func:`score_gqa`."""
    m = report["metrics"]
    if report["task"] == "captions":
        keys = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE"]
        lines = [f"captions ({report['num_images']} images): " + "  ".join(f"{k}={m[k]:.4f}" for k in keys if k in m)]
        if report.get("ids_matched_by_file_name"):
            n = report["ids_matched_by_file_name"]
            lines.append(f"({n} result ids matched to annotation ids by image file name)")
        lines += [f"{name} skipped: {reason}" for name, reason in report["skipped"].items()]
        return "\n".join(lines)
    if report["task"] == "vqa":
        label = "official VQA accuracy" if report["mode"] == "official" else "SIMPLIFIED VQA accuracy (NOT comparable)"
        lines = [f"{label}: {m['overall']:.2f} over {report['num_questions']} questions"]
        lines += [f"  {k}: {v:.2f}" for k, v in sorted(m["per_answer_type"].items())]
        if "warning" in m:
            lines.append(f"warning: {m['warning']}")
        return "\n".join(lines)
    lines = [f"GQA accuracy (exact match): {m['overall']:.2f} ({m['correct']}/{m['num_questions']})"]
    lines += [f"  {k}: {v:.2f}" for k, v in sorted(m["per_answer_type"].items())]
    if report.get("unbalanced_left_out"):
        lines.append(f"  ({report['unbalanced_left_out']} unbalanced questions left out, as GQA's eval.py does)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lavis-ext score",
        description="Score a result file against an annotation file (captions, VQA accuracy, GQA exact match).",
    )
    sub = parser.add_subparsers(dest="task", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--results", required=True, help="result JSON (or JSONL)")
    common.add_argument("--annotations", required=True, help="annotation file")
    common.add_argument("--out", default=None, help="metrics JSON to write (default: <results>_metrics.json)")
    cap = sub.add_parser("captions", parents=[common], help="BLEU, METEOR, ROUGE-L, CIDEr-D (and SPICE) via pycocoevalcap")
    cap.add_argument("--metrics", nargs="+", default=None, help="subset of BLEU METEOR ROUGE_L CIDEr SPICE")
    cap.add_argument("--work-dir", default=None, help="folder for temporary files and the SPICE cache")
    cap.add_argument("--spice-lib", default=None, help="folder with the Stanford CoreNLP 3.6.0 jars (SPICE)")
    vqa = sub.add_parser("vqa", parents=[common], help="official VQA accuracy (VQAv2, OK-VQA, ...)")
    vqa.add_argument("--questions", default=None, help="VQAv2 question file of the same split (optional)")
    vqa.add_argument("--mode", choices=["official", "simplified"], default="official",
                     help="simplified = min(#matches/3, 1), NOT comparable with published numbers")
    sub.add_parser("gqa", parents=[common], help="GQA exact match")
    return parser


def main(argv=None) -> int:
    """Entry point; returns the exit status (0 ok, 1 data error, 2 usage error)."""
    args = build_parser().parse_args(argv)
    try:
        if args.task == "captions":
            report = score_captions(args.results, args.annotations, metrics=args.metrics, work_dir=args.work_dir,
                                    spice_lib_dir=args.spice_lib)
        elif args.task == "vqa":
            report = score_vqa(args.results, args.annotations, questions=args.questions, mode=args.mode)
        else:
            report = score_gqa(args.results, args.annotations)
    except (FileNotFoundError, ValueError, TypeError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else Path(args.results).with_name(Path(args.results).stem + "_metrics.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(format_report(report))
    print(f"metrics written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

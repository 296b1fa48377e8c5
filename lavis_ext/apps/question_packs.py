"""Question packs: ask a fixed set of questions of one image, paying for the vision encoder once.

A pack is a data file (YAML or JSON), not code, so a team adds its own set without touching Python::

    name: document
    description: What kind of document an image shows and its main visible content.
    notice: null                  # or a text printed before the answers and stored in the results
    questions:
      - {id: type, question: What type of document is this?}

Shipped packs live in ``lavis_ext/configs/question_packs/`` (``document``, ``chart``, ``medical``); the
medical one carries a not-for-clinical-use notice that the CLI prints prominently and every result keeps.

Why cached features: the frozen ViT is the costly part of BLIP-2 (ViT-g has 1B parameters), and it does
not depend on the question. ``predictor.encode`` runs it once; all questions then go through the Q-Former
and the LLM in one batch with ``features=``.

CLI: ``lavis-ext ask --checkpoint RUN_DIR --pack document|chart|medical|PATH IMAGE [--json OUT]``.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lavis_ext import inference

PACK_DIR = Path(__file__).resolve().parents[1] / "configs" / "question_packs"
PACK_KEYS = {"name", "description", "notice", "questions"}
QUESTION_KEYS = {"id", "question"}


class PackError(ValueError):
    """A pack that cannot be found or does not follow the pack format."""


@dataclass(frozen=True)
class QuestionPack:
    """A named list of ``(id, question)`` with an optional notice shown with every result."""

    name: str
    questions: tuple[tuple[str, str], ...]
    description: str = ""
    notice: str | None = None
    source: str = ""
    ids: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "ids", tuple(qid for qid, _ in self.questions))


def shipped_packs() -> list[str]:
    """Names of the packs that come with the package."""
    return sorted(p.stem for p in PACK_DIR.glob("*.yaml"))


def load_pack(name_or_path: str | Path) -> QuestionPack:
    """A shipped pack by name (``document``, ``chart``, ``medical``) or a pack file (.yaml/.yml/.json).

    Raises:
        PackError: unknown name / missing file, unreadable file, or a file that breaks the pack format
            (the message names the key or question at fault).
    """
    text = str(name_or_path)
    path = Path(text)
    if not path.is_file():
        if text in shipped_packs():
            path = PACK_DIR / f"{text}.yaml"
        else:
            raise PackError(
                f"question pack {text!r} is neither a shipped pack ({', '.join(shipped_packs())}) "
                "nor an existing .yaml/.json file"
            )
    try:
        raw = path.read_text(encoding="utf-8")
        data = json.loads(raw) if path.suffix.lower() == ".json" else yaml.safe_load(raw)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as exc:
        raise PackError(f"cannot read question pack {str(path)!r}: {exc}") from None
    return parse_pack(data, source=str(path))


def parse_pack(data, source: str = "<data>") -> QuestionPack:
    """Check a loaded pack mapping and turn it into a :class:`QuestionPack` (errors name the bad part)."""
    where = f"question pack {source!r}"
    if not isinstance(data, dict):
        raise PackError(f"{where} must be a mapping with keys {sorted(PACK_KEYS)}, got {type(data).__name__}")
    unknown = sorted(set(data) - PACK_KEYS)
    if unknown:
        raise PackError(f"{where} has unknown key(s) {unknown}; valid keys: {sorted(PACK_KEYS)}")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise PackError(f"{where} needs a non-empty string 'name'")
    notice = data.get("notice")
    if notice is not None and (not isinstance(notice, str) or not notice.strip()):
        raise PackError(f"{where}: 'notice' must be a non-empty string or null")
    questions = data.get("questions")
    if not isinstance(questions, list) or not questions:
        raise PackError(f"{where} needs a non-empty list 'questions' of {{id, question}} entries")
    parsed, seen = [], set()
    for number, entry in enumerate(questions, 1):
        if not isinstance(entry, dict) or set(entry) != QUESTION_KEYS:
            raise PackError(f"{where}: question #{number} must have exactly the keys 'id' and 'question', got {entry!r}")
        qid, question = str(entry["id"]).strip(), entry["question"]
        if not qid or qid in seen:
            raise PackError(f"{where}: question #{number} has an empty or duplicate id {qid!r}; ids must be unique")
        if not isinstance(question, str) or not question.strip():
            raise PackError(f"{where}: question {qid!r} must be a non-empty string")
        seen.add(qid)
        parsed.append((qid, question.strip()))
    return QuestionPack(
        name=name.strip(), questions=tuple(parsed), description=str(data.get("description") or ""),
        notice=notice.strip() if notice else None, source=source,
    )


def run_pack(predictor, pack: QuestionPack, image, decoding=None, image_name: str | None = None) -> dict:
    """Answer every question of ``pack`` about ``image`` (a PIL image) with one ViT pass.

    Returns:
        ``{"pack", "description", "notice", "image", "model", "answers": [{"id", "question", "answer"}]}``.
    """
    features = predictor.encode([image])
    questions = [question for _, question in pack.questions]
    answers = predictor.answer(None, questions, decoding=decoding, features=features)
    return {
        "pack": pack.name,
        "description": pack.description,
        "notice": pack.notice,
        "image": image_name,
        "model": {"source": predictor.source, "arch": predictor.arch},
        "answers": [
            {"id": qid, "question": question, "answer": answer}
            for (qid, question), answer in zip(pack.questions, answers)
        ],
    }


def open_image(path: str | Path):
    """A local image file -> RGB PIL image (:func:`lavis_ext.images.decode_image`: 16-bit scans scaled, not
    clipped to white; a truncated file refused, not padded with grey), with an error that names the file."""
    from lavis_ext.images import decode_image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} does not exist")
    try:
        return decode_image(path)
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # PIL's errors for non-images and broken data
        raise ValueError(
            f"{str(path)!r} is not an image PIL can read, or is truncated ({exc}); give a complete PNG/JPEG/... file"
        ) from None


def notice_banner(notice: str) -> str:
    """The notice framed so it cannot be missed in a terminal."""
    rule = "!" * 78
    return f"{rule}\n{notice}\n{rule}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lavis-ext ask", description="Ask a question pack of one image (the vision encoder runs once)."
    )
    inference.add_source_arguments(parser)
    parser.add_argument("--pack", required=True, help=f"a shipped pack ({', '.join(shipped_packs())}) or a pack file")
    parser.add_argument("--num-beams", type=int, default=None, help="beam count (default: the run's)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="answer length limit (default: the run's)")
    parser.add_argument("--json", dest="json_out", default=None, help="write the results to this JSON file")
    parser.add_argument("image", help="the image file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        pack = load_pack(args.pack)
        image = open_image(args.image)
    except (PackError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if pack.notice:  # before loading the model, so it is seen even if loading fails
        print(notice_banner(pack.notice), file=sys.stderr)
    predictor = inference.load_from_args(args)
    try:
        decoding = predictor.answer_decoding.with_options(num_beams=args.num_beams, max_new_tokens=args.max_new_tokens)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = run_pack(predictor, pack, image, decoding=decoding, image_name=str(args.image))
    width = max(len(qid) for qid in pack.ids)
    for item in result["answers"]:
        print(f"{item['id']:<{width}}  {item['question']}\n{'':<{width}}  -> {item['answer']}")
    if pack.notice:
        print(notice_banner(pack.notice))
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

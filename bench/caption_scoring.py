"""Time to score 5,000 captions x 5 references: ours against pycocoevalcap's COCOEvalCap run the way LAVIS runs it.

Peer (LAVIS's ``coco_caption_eval``): COCO-format ground-truth and result files on disk, ``COCO(gt)``,
``coco.loadRes(results)``, ``COCOEvalCap(coco, res).evaluate()``: two PTB tokenizer JVMs, BLEU, METEOR (one pipe round
trip per image), ROUGE-L, CIDEr-D one after the other. Its SPICE step is stubbed out (it downloads Stanford CoreNLP,
impossible offline; ours reports SPICE as skipped), and its tokenizer's temporary file is redirected to the run's
temp folder instead of site-packages (the same work).
Ours: ``lavis_ext.evaluation.score.score_captions`` on the same two files (reading them included): one tokenizer pass
and METEOR's reference normaliser in one JVM that stays up between calls (``lavis_ext.evaluation.text_server``: warm
from the second call on, as in a training run or a sweep; its CPU time is counted), METEOR's paraphrase table cut to what the references can use (lavis_ext/evaluation/meteor_paraphrases.py; its
one-time index of the full table is built before the timed runs and reported), METEOR fed without round trips from
a thread, over two JVMs for large sets, BLEU/ROUGE-L/CIDEr-D meanwhile. Ours is timed two ways: new references
each call (its memo of reference-side work cleared first: the references are tokenised, normalised and the table
cut every time), and the same references as its previous call (the validation set scored every epoch of a
training run: the process remembers the references' tokens and METEOR words, so only the candidates are
tokenised and METEOR starts scoring at once; ``caption_metrics._ReferenceMemo``). The peer has no such memo: LAVIS
runs ``COCOEvalCap`` afresh each epoch.

The captions are synthetic and deterministic (seeded): 8-16 words from COCO-like templates, mixed case and
punctuation, with two vocabularies: ~100 template words ("small"), or most nouns drawn by a Zipf law from 10,000
WordNet lemmas shipped in METEOR's jar ("large": ~7,000 distinct words in 5,000 x 5 captions, the size of a COCO
test split's, so METEOR's paraphrase cut keeps ~10x more entries).
Runs alternate peer/ours so that load changes on a shared machine hit both. Prints median/min/max of
``--runs`` runs each for wall time and for CPU time (this process plus its Java children: load-independent on a
shared machine), the ratios of the medians, and the largest score difference (must be <= 1e-9). These are repeat
calls: the paraphrase index is built, the Java server compiled and one untimed call per side made before them (ours'
servers are then up, as from a training run's second validation on).

First calls are reported apart, each side in a fresh interpreter timing only its call (imports done), on the small
vocabulary: ours with the index cached (what every new process pays: index load, a cold text server JVM) and ours
with an empty cache (``$LAVIS_EXT_CACHE`` a new folder: the one-time index build and server compile, once per machine),
against the peer's first call (it has no one-time step).
Usage: python bench/caption_scoring.py [--quick] [--runs 3] [--json OUT] [--images 5000] [--refs 5]
                                      [--vocabulary small|large|both]
(--quick: 2 runs each instead of 3; the size stays 5,000, the one the target is set for.)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, print_rows, process_cpu_seconds, resolve_runs, row, stat, write_json  # noqa: E402

KEYS = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]
SUBJECTS = ["a man", "a woman", "two dogs", "a cat", "a group of people", "a young boy", "an old bus", "a red car",
            "three birds", "a plate of food", "a brown horse", "a little girl", "a train", "a giraffe", "two men"]
VERBS = ["sitting on", "standing next to", "riding", "walking down", "looking at", "playing with", "parked near",
         "eating", "lying on", "flying over", "holding", "crossing"]
OBJECTS = ["a wooden bench", "the beach", "a busy street", "a green field", "a frisbee", "a large table",
           "the snow", "a kitchen counter", "a tall building", "the water", "a skateboard", "a pizza", "the grass"]
TAILS = ["", " in the park", " at night", " on a sunny day", " with a ball", " near the ocean", " in a room",
         ", looking happy", " while it rains", " in front of a house"]


def wordnet_nouns(count: int, seed: int = 0) -> list[str]:
    """``count`` WordNet lemmas (lower-case, 3-12 letters) from the synonym list inside METEOR's jar, shuffled."""
    import zipfile

    from lavis_ext.evaluation.meteor_paraphrases import meteor_jar

    with zipfile.ZipFile(meteor_jar()) as jar:
        lemmas = jar.read("synonym/english.synsets").decode().split("\n")[0::2]
    words = sorted({w for w in lemmas if w.isascii() and w.isalpha() and w.islower() and 3 <= len(w) <= 12})
    random.Random(seed).shuffle(words)
    return words[:count]


def make_captions(num_images: int, num_refs: int, seed: int = 0, nouns: list[str] | None = None) -> tuple[dict, dict]:
    """Template captions; with ``nouns``, most subjects and objects are drawn from them by a Zipf law (a large,
    COCO-sized vocabulary, so that METEOR's paraphrase table cut keeps far more entries)."""
    rng = random.Random(seed)
    weights = [1.0 / rank for rank in range(1, len(nouns) + 1)] if nouns else None

    def noun_phrase(fixed: list[str], article: str) -> str:
        if nouns and rng.random() < 0.7:
            return f"{article} {rng.choices(nouns, weights)[0]}"
        return rng.choice(fixed)

    def caption() -> str:
        subject, obj = noun_phrase(SUBJECTS, "a"), noun_phrase(OBJECTS, "the")
        text = f"{subject} {rng.choice(VERBS)} {obj}{rng.choice(TAILS)}"
        if rng.random() < 0.5:
            text = text[0].upper() + text[1:]
        return text + rng.choice(["", ".", " .", "!"])

    refs = {100000 + i: [caption() for _ in range(num_refs)] for i in range(num_images)}
    preds = {i: caption() for i in refs}
    return refs, preds


def write_files(folder: Path, refs: dict, preds: dict) -> tuple[Path, Path]:
    anns = [{"image_id": i, "caption": c} for i, cs in refs.items() for c in cs]
    for n, ann in enumerate(anns, start=1):
        ann["id"] = n
    gt = folder / "captions_gt.json"
    gt.write_text(json.dumps({"images": [{"id": i} for i in refs], "annotations": anns, "type": "captions",
                              "info": {}, "licenses": []}))
    res = folder / "results.json"
    res.write_text(json.dumps([{"image_id": i, "caption": c} for i, c in preds.items()]))
    return gt, res


class _NoSpice:
    def compute_score(self, gts, res):
        return 0.0, [0.0] * len(gts)

    def method(self):
        return "SPICE"


def cpu_seconds() -> float:
    """CPU time of this process, its reaped children (the JVMs) and ours' caption text server, which stays up
    between calls (so it is never reaped): user + system."""
    from lavis_ext.evaluation import text_server

    gc.collect()  # the peer's Meteor JVM is stopped and reaped in Meteor.__del__
    t = os.times()
    server = sum(process_cpu_seconds(pid) for pid in text_server.live_pids())
    return t.user + t.system + t.children_user + t.children_system + server


def timed(fn, *args) -> tuple[float, float, dict]:
    """(wall seconds, CPU seconds incl. child processes, scores)."""
    cpu0, start = cpu_seconds(), time.perf_counter()
    scores = fn(*args)
    wall = time.perf_counter() - start
    return wall, cpu_seconds() - cpu0, scores


def run_peer(gt: Path, res: Path, tmp: Path) -> dict:
    """LAVIS's lavis/tasks/captioning.py::coco_caption_eval, minus the download and the SPICE step."""
    import contextlib
    import io

    import pycocoevalcap.eval as coco_eval_module
    from pycocoevalcap.tokenizer import ptbtokenizer
    from pycocotools.coco import COCO

    real_file, real_spice = ptbtokenizer.__file__, coco_eval_module.Spice
    jar = Path(real_file).with_name(ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    link = tmp / jar.name
    if not link.exists():
        link.symlink_to(jar)
    ptbtokenizer.__file__, coco_eval_module.Spice = str(tmp / "ptbtokenizer.py"), _NoSpice
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            coco = COCO(str(gt))
            coco_result = coco.loadRes(str(res))
            coco_eval = coco_eval_module.COCOEvalCap(coco, coco_result)
            coco_eval.evaluate()
    finally:
        ptbtokenizer.__file__, coco_eval_module.Spice = real_file, real_spice
    return {k: coco_eval.eval[k] for k in KEYS}


def run_ours(gt: Path, res: Path, tmp: Path) -> dict:
    """New references: the memo of an earlier call on them is cleared first."""
    from lavis_ext.evaluation.caption_metrics import REFERENCE_MEMO

    REFERENCE_MEMO.clear()
    return run_ours_same_references(gt, res, tmp)


def run_ours_same_references(gt: Path, res: Path, tmp: Path) -> dict:
    """The references of the previous call (every epoch's validation): their tokens and METEOR words remembered."""
    from lavis_ext.evaluation.score import score_captions

    report = score_captions(res, gt, metrics=["BLEU", "METEOR", "ROUGE_L", "CIDEr"], work_dir=tmp / "ours")
    return report["metrics"]


def prepare_meteor_index() -> str:
    """Build (once per machine) or load the paraphrase index outside the timings; say which and how long."""
    from lavis_ext.evaluation import meteor_paraphrases

    start = time.perf_counter()
    index = meteor_paraphrases.load_index()
    elapsed = time.perf_counter() - start
    built = index.build_seconds
    how = f"built now in {elapsed:.1f} s" if elapsed > 5 else f"loaded in {elapsed:.2f} s (built once in {built:.0f} s)"
    print(f"METEOR paraphrase index: {index.num_entries:,} entries, {how}")
    return "its index of the full table built before these runs: see the first-call rows"


def first_call(side: str, gt: Path, res: Path, cache: Path | None) -> float:
    """Wall seconds of ``side``'s first call in a fresh interpreter (``cache``: a ``$LAVIS_EXT_CACHE`` to use)."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    if cache is not None:
        env["LAVIS_EXT_CACHE"] = str(cache)
    cmd = [sys.executable, "-W", "ignore", __file__, "--first-call-child", side, str(gt), str(res)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("FIRST ")]
    if proc.returncode or not lines:
        raise SystemExit(f"first call of {side} failed: {proc.stderr[-2000:]}")
    return float(lines[-1].split()[1])


def first_call_child(side: str, gt: str, res: str) -> int:
    """In the fresh interpreter: import, then time one call (``FIRST <seconds>`` on stdout)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import lavis_ext.evaluation.score  # noqa: F401
    import pycocoevalcap.eval  # noqa: F401
    fn = {"ours": run_ours, "peer": run_peer}[side]
    with tempfile.TemporaryDirectory(prefix="bench_capscore_first_") as tmp:
        start = time.perf_counter()
        fn(Path(gt), Path(res), Path(tmp))
        print(f"FIRST {time.perf_counter() - start}", flush=True)
    return 0


def measure_first_calls(args) -> list[dict]:
    """Peer, ours (index cached), ours (empty cache) first calls, each in a fresh interpreter, once each."""
    refs, preds = make_captions(args.images, args.refs)
    with tempfile.TemporaryDirectory(prefix="bench_capscore_") as tmp_name:
        tmp = Path(tmp_name)
        gt, res = write_files(tmp, refs, preds)
        peer = first_call("peer", gt, res, None)
        cached = first_call("ours", gt, res, None)
        empty = first_call("ours", gt, res, tmp / "empty_cache")
    print(f"first call in a fresh process: peer {peer:.1f} s, ours {cached:.1f} s (index cached), "
          f"{empty:.1f} s (empty cache: index build + server compile)", flush=True)
    what = f"caption scoring, {args.images:,} captions x {args.refs} refs, small vocabulary: first call in a fresh process"
    peer_stat = stat("pycocoevalcap COCOEvalCap as LAVIS runs it", [peer])
    return [row(f"{what}, index cached (every new process)", "s", stat("lavis_ext score_captions", [cached]), peer_stat,
                higher_is_better=False, note="one call per side; imports done before the timing"),
            row(f"{what}, empty cache (once per machine)", "s",
                stat("lavis_ext score_captions incl. METEOR paraphrase index build", [empty]), peer_stat,
                higher_is_better=False,
                note=f"the one-time index of METEOR's 5.27 M-entry paraphrase table (and the Java text server) is built in "
                     f"this call: {empty - cached:.0f} s more than with the index cached; later processes load it")]


def summary(times: list[float]) -> str:
    return f"median {statistics.median(times):.2f} s (min {min(times):.2f}, max {max(times):.2f})"


def cut_size(refs: dict, preds: dict, tmp: Path) -> int:
    """How many paraphrase-table entries ours keeps for these captions (outside the timings)."""
    import gzip

    from lavis_ext.evaluation import caption_metrics as cm
    from lavis_ext.evaluation import meteor_paraphrases

    java, _ = cm._require_java()
    gts, res = cm._tokenise_all(list(refs.values()), list(preds.values()), str(tmp), java)
    table = meteor_paraphrases.table_for(cm._meteor_score_lines(gts, res), tmp, java)
    if table is None:
        return 0
    with gzip.open(table, "rb") as f:
        entries = sum(1 for _ in f) // 3
    table.unlink()
    return entries


def measure(args, vocabulary_name: str, index_note: str) -> list[dict]:
    """Alternate peer/ours runs on one caption set; check the scores; return the bench rows."""
    nouns = wordnet_nouns(10_000) if vocabulary_name == "large" else None
    refs, preds = make_captions(args.images, args.refs, nouns=nouns)
    vocabulary = {w for captions in refs.values() for c in captions for w in c.lower().split()}
    sides = (("peer", run_peer), ("ours", run_ours), ("ours_memo", run_ours_same_references))
    times: dict[str, list[float]] = {name: [] for name, _ in sides}
    cpu: dict[str, list[float]] = {name: [] for name, _ in sides}
    worst = 0.0
    with tempfile.TemporaryDirectory(prefix="bench_capscore_") as tmp_name:
        tmp = Path(tmp_name)
        gt, res = write_files(tmp, refs, preds)
        for _, fn in sides[:2]:  # one untimed call per side: these rows are repeat calls (first calls: their own rows)
            fn(gt, res, tmp)
        for run in range(args.runs):
            scores = {}
            for name, fn in sides if run % 2 == 0 else sides[::-1]:  # ours_memo always follows an ours call
                elapsed, used, scores[name] = timed(fn, gt, res, tmp)
                times[name].append(elapsed)
                cpu[name].append(used)
                print(f"{vocabulary_name} vocabulary, run {run + 1}/{args.runs} {name}: {elapsed:.2f} s wall, "
                      f"{used:.2f} s CPU", flush=True)
            worst = max(worst, *(abs(scores[side][k] - scores["peer"][k]) for side in ("ours", "ours_memo") for k in KEYS))
        kept = cut_size(refs, preds, tmp)
    ratio = statistics.median(times["peer"]) / statistics.median(times["ours"])
    memo_ratio = statistics.median(times["peer"]) / statistics.median(times["ours_memo"])
    cpu_ratio = statistics.median(cpu["peer"]) / statistics.median(cpu["ours"])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n{args.images} captions x {args.refs} references, {vocabulary_name} vocabulary ({len(vocabulary):,} "
          f"words), {args.runs} runs each, {os.cpu_count()} CPUs, load average {load:.1f} at the end")
    print(f"peer (COCOEvalCap as LAVIS runs it, SPICE stubbed): wall {summary(times['peer'])}; "
          f"CPU {summary(cpu['peer'])}")
    print(f"ours (lavis_ext score_captions):                   wall {summary(times['ours'])}; "
          f"CPU {summary(cpu['ours'])}")
    print(f"ours, same references as its last call:            wall {summary(times['ours_memo'])}; "
          f"CPU {summary(cpu['ours_memo'])}")
    print(f"speed-up, wall (median / median): {ratio:.2f}x new references, {memo_ratio:.2f}x same references   "
          "(target >= 3x)")
    print(f"CPU used, peer / ours (median / median): {cpu_ratio:.2f}x")
    print(f"largest score difference over {', '.join(KEYS)}: {worst:.3g}  (must be <= 1e-9)")
    print("scores: " + "  ".join(f"{k}={scores['ours'][k]:.6f}" for k in KEYS))
    if worst > 1e-9:
        raise SystemExit("scores differ")
    what = (f"caption scoring, {args.images:,} captions x {args.refs} refs (BLEU/METEOR/ROUGE-L/CIDEr), "
            f"{vocabulary_name} vocabulary ({len(vocabulary):,} words)")
    peer = "pycocoevalcap COCOEvalCap as LAVIS runs it"
    memo_label = "lavis_ext score_captions, references remembered from its last call"
    return [row(f"{what}, repeat calls, new references each call: wall time", "s",
                stat("lavis_ext score_captions", times["ours"]), stat(peer, times["peer"]), higher_is_better=False,
                target=3.0, note=f"scores identical (largest difference {worst:.1g}); METEOR reads its paraphrase "
                f"table cut to the references ({kept:,} of 5.27 M entries; {index_note}); the path of a call: PTB "
                f"tokenisation, then METEOR's reference normaliser beside BLEU and ROUGE-L (both in the warm text "
                f"server JVM), then METEOR's own scoring in two JVMs on the two cores beside CIDEr-D"),
            row(f"{what}, repeat calls, new references each call: CPU time incl. Java children", "s",
                stat("lavis_ext score_captions", cpu["ours"]), stat(peer, cpu["peer"]), higher_is_better=False,
                note="load-independent on a shared machine"),
            row(f"{what}, repeat calls on the same references (validation every epoch): wall time", "s",
                stat(memo_label, times["ours_memo"]), stat(peer, times["peer"]), higher_is_better=False, target=3.0,
                note="the references' PTB tokens and METEOR words from the previous call (only the candidates "
                     "tokenised, no normaliser JVM); scores identical; LAVIS re-runs COCOEvalCap in full every epoch"),
            row(f"{what}, repeat calls on the same references (validation every epoch): CPU time incl. Java children",
                "s", stat(memo_label, cpu["ours_memo"]), stat(peer, cpu["peer"]), higher_is_better=False,
                note="load-independent on a shared machine")]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--first-call-child"]:
        return first_call_child(*argv[1:4])
    parser = add_common_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter),
                             runs=3, quick_runs=2)
    parser.add_argument("--images", type=int, default=5000, help="captions to score")
    parser.add_argument("--refs", type=int, default=5)
    parser.add_argument("--vocabulary", choices=["small", "large", "both"], default="both",
                        help="small: ~100 template words; large: most nouns drawn from 10,000 WordNet lemmas by a "
                             "Zipf law (~7,000 distinct words in 5,000 x 5 captions, COCO-sized); both (default)")
    parser.add_argument("--no-first-call", action="store_true", help="skip the first-call rows (the empty-cache one "
                        "rebuilds METEOR's paraphrase index: ~45 s)")
    args = parser.parse_args(argv)
    args.runs = resolve_runs(args)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import lavis_ext.evaluation.score  # noqa: F401  (import cost outside the timings)
    index_note = prepare_meteor_index()
    rows = []
    for name in (["small", "large"] if args.vocabulary == "both" else [args.vocabulary]):
        rows += measure(args, name, index_note)
    if not args.no_first_call:
        rows += measure_first_calls(args)
    print_rows(rows)
    write_json(args.json, "caption_scoring", rows, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())

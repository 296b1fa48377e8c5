"""Caption metrics against hand-computed values and against pycocoevalcap's own tokenizer + scorers.

Needs Java (PTB tokenisation, METEOR); no network. METEOR's JVM takes ~7 s to start, so only two tests run it.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest

from lavis_ext.evaluation import best_constant_caption, evaluate_captions
from lavis_ext.evaluation import caption_metrics as cm
from lavis_ext.evaluation import text_server

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="Java is needed for PTB tokenisation")

NO_JAVA_METRICS = ("BLEU", "ROUGE_L", "CIDEr")

# Captions of >= 4 tokens, so BLEU-4 has 4-grams to count (a 3-word caption caps BLEU-4 at ~0.03 in pycocoevalcap).
IDENTICAL = {
    "img-1": "a man riding a horse on the beach",
    "img-2": "two dogs playing with a red ball",
    "img-3": "a plate of food on a wooden table",
}

TRICKY = [
    "A man's hat, isn't it?",
    'He said "hello" (twice) -- then left...',
    "Two-year-old child; 3.5 km/h: wow!",
    "ROCK 'n' roll `quoted` {braces} [brackets]",
    "  leading and trailing spaces  ",
    "",
    "...",
    "café naïve résumé",
    "U.S.A. Dr. Smith's cat's toys",
    "line\nbreak inside",
    "can't won't I'm we'll they'd",
    "e-mail & co. 50% off $20 -- well-known",
    "A RED Circle, LEFT of a Blue-Square.",
]


def _pycocoevalcap_dir() -> Path:
    import pycocoevalcap.bleu.bleu  # noqa: F401

    return Path(list(sys.modules["pycocoevalcap"].__path__)[0])


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under root with (mtime_ns, size): a new, removed or rewritten file changes it."""
    snap = {}
    for dirpath, _, filenames in os.walk(root):
        for name in [".", *filenames]:
            path = Path(dirpath, name)
            st = path.stat()
            snap[str(path.relative_to(root))] = (st.st_mtime_ns, st.st_size)
    return snap


def _child_pids() -> set[int]:
    """Live children of this process, read from /proc (a reaped JVM is gone; a leaked one is listed)."""
    me, children = os.getpid(), set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == me and fields[0] != "Z":
            children.add(int(entry.name))
    return children


@pytest.fixture(autouse=True)
def _fresh_reference_memo():
    """Each test starts without remembered references (the memo is per process; its own test is below)."""
    cm.REFERENCE_MEMO.clear()
    yield
    cm.REFERENCE_MEMO.clear()


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """All metrics on identical candidates/references, recording site-packages and child processes around it."""
    for mod in ("bleu.bleu", "meteor.meteor", "rouge.rouge", "cider.cider", "tokenizer.ptbtokenizer"):
        importlib.import_module(f"pycocoevalcap.{mod}")  # Python's own .pyc writes happen here, not in the run
    pkg = _pycocoevalcap_dir()
    before, children_before = _snapshot(pkg), _child_pids()
    work = tmp_path_factory.mktemp("capeval")
    preds = {k: [v.capitalize() + "."] for k, v in IDENTICAL.items()}  # tokenisation must undo case and "."
    refs = {k: [v] for k, v in IDENTICAL.items()}
    result = evaluate_captions(preds, refs, work_dir=work, spice_lib_dir=work / "no_spice_jars")
    after = _snapshot(pkg)
    return {
        "result": result,
        "site_packages_changed": {k for k in set(before) | set(after) if before.get(k) != after.get(k)},
        "new_children": _child_pids() - children_before,
        "servers": text_server.live_pids(),  # the JVMs kept up between calls on purpose
        "work": work,
    }


@needs_java
def test_identical_captions_score_perfectly(full_run):
    r = full_run["result"]
    for n in range(1, 5):
        assert r[f"Bleu_{n}"] == pytest.approx(1.0, abs=1e-6)
    assert r["ROUGE_L"] == pytest.approx(1.0)
    # METEOR keeps a fragmentation penalty of 0.5 * (1 chunk / m matches)^3 even for a perfect match.
    assert 0.99 < r["METEOR"] <= 1.0
    # CIDEr-D: cosine 1 for each n-gram order, no length penalty, times 10.
    assert r["CIDEr"] == pytest.approx(10.0, abs=1e-9)
    assert set(r) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "skipped"}


@needs_java
def test_nothing_written_into_site_packages_and_no_java_left_running_but_the_servers(full_run):
    assert full_run["site_packages_changed"] == set()
    assert full_run["new_children"] - full_run["servers"] == set()
    assert list(full_run["work"].iterdir()) == []  # the tokenizer's temp files are removed too


@needs_java
def test_spice_is_skipped_with_a_reason_when_jars_are_missing(full_run):
    reason = full_run["result"]["skipped"]["SPICE"]
    assert "no_spice_jars" in reason and "stanford-corenlp-3.6.0.jar" in reason and cm.SPICE_LIB_ENV in reason


@needs_java
def test_spice_lib_dir_defaults_to_env_var_then_pycocoevalcap(tmp_path, monkeypatch):
    monkeypatch.setenv(cm.SPICE_LIB_ENV, str(tmp_path / "from_env"))
    r = evaluate_captions({1: "a cat"}, {1: ["a cat"]}, metrics=["SPICE"], work_dir=tmp_path / "w")
    assert "from_env" in r["skipped"]["SPICE"] and set(r) == {"skipped"}
    monkeypatch.delenv(cm.SPICE_LIB_ENV)
    assert cm._spice_lib_dir(None) == _pycocoevalcap_dir().resolve() / "spice" / "lib"


@needs_java
def test_spice_with_unusable_jars_is_skipped_and_keeps_files_in_work_dir(tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir()
    for jar in cm.SPICE_CORENLP_JARS:
        (lib / jar).write_bytes(b"")  # present but empty: the jar-present path runs Java and must fail cleanly
    before = _snapshot(_pycocoevalcap_dir())
    with pytest.warns(RuntimeWarning, match="SPICE"):
        r = evaluate_captions({1: "a cat"}, {1: ["a cat"]}, metrics=["SPICE", "BLEU"], work_dir=tmp_path / "w",
                              spice_lib_dir=lib)
    assert r["skipped"]["SPICE"].startswith("SPICE failed") and "Bleu_1" in r and "SPICE" not in r
    assert (tmp_path / "w" / "spice_cache").is_dir()
    assert _snapshot(_pycocoevalcap_dir()) == before


@needs_java
def test_disjoint_candidate_scores_zero(tmp_path):
    preds = {1: "zebra giraffe elephant", 2: "purple banana spaceship orbit"}
    refs = {1: ["a red square on the table"], 2: ["two dogs play in the park"]}
    r = evaluate_captions(preds, refs, metrics=NO_JAVA_METRICS, work_dir=tmp_path)
    assert all(r[f"Bleu_{n}"] < 1e-6 for n in range(1, 5))
    assert r["ROUGE_L"] == 0.0
    assert r["CIDEr"] == 0.0


@needs_java
def test_bleu1_and_rouge_l_by_hand(tmp_path):
    # candidate "a red circle" vs reference "a red square": unigram precision 2/3, bigram 1/2, brevity penalty 1;
    # LCS "a red" = 2 tokens, so P = R = 2/3 and F_beta = 2/3 for any beta. Case and "." must not matter.
    r = evaluate_captions({"x": "A red circle."}, {"x": ["a red square"]}, metrics=NO_JAVA_METRICS, work_dir=tmp_path)
    assert r["Bleu_1"] == pytest.approx(2 / 3, rel=1e-6)
    assert r["Bleu_2"] == pytest.approx(math.sqrt(2 / 3 * 1 / 2), rel=1e-6)
    assert r["ROUGE_L"] == pytest.approx(2 / 3)
    # CIDEr-D takes IDF from the evaluated references: with one image every n-gram has idf log(1) - log(1) = 0.
    assert r["CIDEr"] == 0.0


@pytest.fixture
def library_tokenizer(tmp_path, monkeypatch):
    """pycocoevalcap's own PTBTokenizer, run from tmp_path (it writes next to `__file__`), jar linked in."""
    from pycocoevalcap.tokenizer import ptbtokenizer

    jar = Path(ptbtokenizer.__file__).with_name(ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    (tmp_path / jar.name).symlink_to(jar)
    monkeypatch.setattr(ptbtokenizer, "__file__", str(tmp_path / "ptbtokenizer.py"))
    return ptbtokenizer.PTBTokenizer()


@needs_java
def test_tokenisation_matches_pycocoevalcap_on_tricky_strings(tmp_path, library_tokenizer):
    ours = cm.ptb_tokenize(TRICKY, tmp_path)
    theirs = library_tokenizer.tokenize({i: [{"caption": s}] for i, s in enumerate(TRICKY)})
    assert ours == [theirs[i][0] for i in range(len(TRICKY))]
    assert ours[0] == "a man 's hat is n't it"  # apostrophes split, punctuation dropped, lower-cased
    assert ours[1] == "he said hello -lrb- twice -rrb- then left"  # -LRB- is lower-cased before removal, as upstream


@needs_java
def test_line_breaks_inside_a_caption_do_not_shift_later_captions(tmp_path):
    assert cm.ptb_tokenize(["a\rb", "c\u2028d", "e\x0bf", "last"], tmp_path) == ["a b", "c d", "e f", "last"]


@needs_java
def test_scores_match_pycocoevalcap_pipeline(tmp_path, library_tokenizer):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    refs = {
        0: ["A man rides a horse.", "Someone riding a brown horse on the beach!", "a man's horse, running"],
        1: ["Two dogs play with a ball.", "two dogs (brown) chase a red ball", "dogs playing"],
        2: ["A plate of food.", "food on a plate -- on a table", "a meal on a wooden table"],
        3: ["A red circle left of a blue square.", "the red circle isn't right of the square"],
        4: ["An empty street at night.", "a street with no cars at night time"],
    }
    preds = {0: "a man riding a horse", 1: "Two dogs playing with a red ball.", 2: "a plate with food",
             3: "a red circle and a blue square", 4: "a street at night"}
    ours = evaluate_captions(preds, refs, metrics=NO_JAVA_METRICS, work_dir=tmp_path / "w")

    gts = library_tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = library_tokenizer.tokenize({k: [{"caption": c}] for k, c in preds.items()})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert [ours[f"Bleu_{n}"] for n in range(1, 5)] == pytest.approx(bleu, abs=1e-12)
    assert ours["ROUGE_L"] == pytest.approx(Rouge().compute_score(gts, res)[0], abs=1e-12)
    assert ours["CIDEr"] == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-12)
    assert ours["CIDEr"] > 0.5


@needs_java
def test_any_hashable_ids_give_the_same_scores(tmp_path):
    refs = [["a red circle left of a blue square"], ["two dogs play"], ["a green star", "a star that is green"]]
    preds = ["a red circle", "two dogs playing", "a green star"]
    scores = []
    for ids in ([0, 1, 2], ["a", "b", "c"], [("img", 7), 3.5, "7"]):
        r = evaluate_captions(dict(zip(ids, preds)), dict(zip(ids, refs)), metrics=NO_JAVA_METRICS,
                              work_dir=tmp_path)
        scores.append(r)
    assert scores[0] == scores[1] == scores[2]


@needs_java
def test_empty_and_punctuation_only_predictions_are_scored(golden):
    # GOLDEN_PREDS holds "" and "..." (nothing left after tokenisation); the METEOR JVM is shared with the golden run
    assert "" in GOLDEN_PREDS and "..." in GOLDEN_PREDS
    r = golden["ours_a"]
    assert 0.0 < r["METEOR"] < 1.0 and 0.0 < r["ROUGE_L"] < 1.0 and r["CIDEr"] > 0.0


def test_mismatched_ids_are_named():
    with pytest.raises(ValueError, match=r"no prediction, e\.g\. \['only-in-refs'\]"):
        evaluate_captions({"a": "x"}, {"a": ["x"], "only-in-refs": ["y"]})
    with pytest.raises(ValueError, match=r"no references, e\.g\. \[42\]"):
        evaluate_captions({"a": "x", 42: "y"}, {"a": ["x"]})


@pytest.mark.parametrize(
    "preds, refs, error",
    [
        ({1: ["one", "two"]}, {1: ["x"]}, ValueError),  # two candidates
        ({1: []}, {1: ["x"]}, ValueError),
        ({1: 3}, {1: ["x"]}, TypeError),
        ({1: "a"}, {1: []}, ValueError),  # no reference
        ({1: "a"}, {1: ["ok", None]}, TypeError),
        ({}, {}, ValueError),
        ([("a", "b")], {1: ["x"]}, TypeError),
    ],
)
def test_bad_inputs_raise_before_any_java(preds, refs, error):
    with pytest.raises(error):
        evaluate_captions(preds, refs)


def test_unknown_metric_suggests_the_close_name():
    with pytest.raises(ValueError, match="'BLEU'"):
        evaluate_captions({1: "a"}, {1: ["a"]}, metrics=["BLUE"])


def test_missing_java_says_how_to_install(monkeypatch):
    false = shutil.which("false") or "/bin/false"
    monkeypatch.setattr(cm.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get install openjdk-17-jre-headless"):
        evaluate_captions({1: "a"}, {1: ["a"]}, metrics=["CIDEr"])
    monkeypatch.setattr(cm.shutil, "which", lambda name: false)
    with pytest.raises(RuntimeError, match="-version` exited"):
        best_constant_caption({1: ["a"]})


def test_java_major_version_parsing():
    assert cm._java_major('openjdk version "17.0.15" 2025-04-15') == 17
    assert cm._java_major('java version "1.8.0_292"') == 8
    assert cm._java_major('openjdk version "21" 2023-09-19') == 21
    assert cm._java_major("garbage") == 0


@needs_java
def test_meteor_watchdog_stops_a_stuck_jvm(tmp_path, monkeypatch):
    monkeypatch.setattr(cm, "_meteor_timeout", lambda n: 0.05)
    children = _child_pids()
    with pytest.raises(RuntimeError, match="METEOR did not answer within"), \
            pytest.warns(RuntimeWarning, match="did not answer within .*JVM of its own"):
        evaluate_captions({1: "a dog"}, {1: ["a dog"]}, metrics=["METEOR"], work_dir=tmp_path)
    # the servers that timed out were stopped too (the next call starts new ones); nothing else is left running
    assert _child_pids() - children - text_server.live_pids() == set()


@needs_java
def test_best_constant_caption_picks_the_dominant_caption(tmp_path):
    # CIDEr-D gives zero weight to n-grams found in every image's references, so the dominant caption is in 6 of 8.
    refs = {i: ["A red circle.", "a red circle", f"unique words number {i} here"] for i in range(6)}
    refs.update({i: ["A blue square.", "a blue square", f"unique words number {i} here"] for i in (6, 7)})
    caption, cider = best_constant_caption(refs, work_dir=tmp_path)
    assert caption == "a red circle" and cider > 0.0
    # The returned score is what evaluate_captions gives for that constant prediction.
    r = evaluate_captions({i: caption for i in refs}, refs, metrics=["CIDEr"], work_dir=tmp_path)
    assert r["CIDEr"] == pytest.approx(cider, abs=1e-12)
    # Explicit candidates are returned as given (not tokenised); top_k is validated.
    assert best_constant_caption(refs, candidates=["Blue Square!", "A red circle!"], work_dir=tmp_path) == (
        "A red circle!", pytest.approx(cider, abs=1e-12))
    with pytest.raises(ValueError, match="top_k"):
        best_constant_caption(refs, top_k=0)


# ----------------------------------------------------------------------------------------------------------------
# Golden: pycocoevalcap's COCOEvalCap run directly, as LAVIS's coco_caption_eval runs it (COCO-format files in a tmp
# dir, COCO(), loadRes(), evaluate()), against evaluate_captions on the same captions under other ids.
GOLDEN_REFS = [
    ["A man riding a horse on the beach.", "Someone rides a brown horse by the sea!", "a man's horse, running"],
    ["Two dogs play with a red ball.", "two dogs (brown) chase a red ball", "Dogs playing.", "TWO DOGS"],
    ["A plate of food on a wooden table.", "food on a plate -- on a table", "a meal; a wooden table"],
    ['He said "hello" (twice) -- then left...', "a man talking, then leaving", "someone says hello twice"],
    ["café naïve résumé", "A U.S.A. flag isn't here", "e-mail & co. 50% off $20"],
    ["An empty street at night.", "a street with no cars at night time", "night-time street, empty"],
    ["A red circle left of a blue square.", "the red circle isn't right of the square"],
    ["a cat on a mat", "A cat sitting on a mat.", "the cat is on the mat", "cat; mat", "a small cat on a red mat"],
]
GOLDEN_PREDS = [
    "a man riding a horse", "Two dogs playing with a red ball.", "a plate with food on a table",
    "A man says hello.", "", "...", "a red circle and a blue square", "A cat on a mat!",
]
# ids of the same captions for evaluate_captions: any hashables, none of them COCO's integers
NON_NUMERIC_IDS = ["COCO_val2014_000000391895.jpg", ("img", 7), "7", 3.5, "ünïcode id", frozenset({1}), None, "a b"]
# set B: uneven reference counts, single-word and repeated captions; scored without METEOR on both sides
SET_B_REFS = [["dog"], ["a dog", "a dog", "a dog"], ["red red red red", "red"], ["the quick brown fox jumps"]]
SET_B_PREDS = ["dog", "a dog", "red red", "a quick brown fox jumped over"]
COCO_KEYS = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]


class _NoScorer:
    """Stands in for a scorer COCOEvalCap must not run here (SPICE downloads CoreNLP; METEOR for set B)."""

    def __init__(self, name):
        self.name = name

    def compute_score(self, gts, res):
        return 0.0, [0.0] * len(gts)

    def method(self):
        return self.name


def _coco_eval_cap(folder: Path, refs: list, preds: list) -> dict:
    from pycocoevalcap.eval import COCOEvalCap
    from pycocotools.coco import COCO

    folder.mkdir(parents=True, exist_ok=True)
    ids = list(range(1, len(refs) + 1))
    anns = [{"image_id": i, "caption": c} for i, rs in zip(ids, refs) for c in rs]
    for n, ann in enumerate(anns, start=1):
        ann["id"] = n
    gt_file = folder / "gt.json"
    gt_file.write_text(json.dumps({"images": [{"id": i} for i in ids], "annotations": anns, "type": "captions",
                                   "info": {}, "licenses": []}))
    res_file = folder / "res.json"
    res_file.write_text(json.dumps([{"image_id": i, "caption": c} for i, c in zip(ids, preds)]))
    coco = COCO(str(gt_file))
    coco_eval = COCOEvalCap(coco, coco.loadRes(str(res_file)))
    coco_eval.evaluate()
    return dict(coco_eval.eval)


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """COCOEvalCap (in a thread) and evaluate_captions run at the same time: their JVMs start in parallel."""
    import threading

    import pycocoevalcap.eval as coco_eval_module
    from pycocoevalcap.tokenizer import ptbtokenizer

    tmp = tmp_path_factory.mktemp("golden")
    jar = Path(ptbtokenizer.__file__).with_name(ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    (tmp / jar.name).symlink_to(jar)
    out: dict = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ptbtokenizer, "__file__", str(tmp / "ptbtokenizer.py"))  # its temp file goes to tmp
        mp.setattr(coco_eval_module, "Spice", lambda: _NoScorer("SPICE"))

        def theirs_a():
            out["coco_a"] = _coco_eval_cap(tmp / "a", GOLDEN_REFS, GOLDEN_PREDS)

        thread = threading.Thread(target=theirs_a)
        thread.start()
        try:
            out["ours_a"] = evaluate_captions(dict(zip(NON_NUMERIC_IDS, GOLDEN_PREDS)),
                                              dict(zip(NON_NUMERIC_IDS, GOLDEN_REFS)), work_dir=tmp / "ours_a",
                                              metrics=("BLEU", "METEOR", "ROUGE_L", "CIDEr"))
        finally:
            thread.join()
        mp.setattr(coco_eval_module, "Meteor", lambda: _NoScorer("METEOR"))
        out["coco_b"] = _coco_eval_cap(tmp / "b", SET_B_REFS, SET_B_PREDS)
    out["ours_b"] = evaluate_captions(dict(enumerate(SET_B_PREDS)), dict(enumerate(SET_B_REFS)),
                                      metrics=NO_JAVA_METRICS, work_dir=tmp / "ours_b")
    return out


@needs_java
def test_golden_all_metrics_equal_coco_eval_cap_with_non_numeric_ids(golden):
    ours, theirs = golden["ours_a"], golden["coco_a"]
    assert set(ours) == set(COCO_KEYS) | {"skipped"}
    for key in COCO_KEYS:
        assert ours[key] == pytest.approx(theirs[key], abs=1e-9, rel=0), key
    assert 0.1 < ours["METEOR"] < 0.9 and ours["CIDEr"] > 0.5  # a set that exercises every metric


@needs_java
def test_golden_uneven_references_equal_coco_eval_cap(golden):
    ours, theirs = golden["ours_b"], golden["coco_b"]
    for key in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-9, rel=0), key


@needs_java
def test_a_repeat_call_on_the_same_references_reuses_their_side_with_the_same_scores(golden, tmp_path, monkeypatch):
    """Epoch after epoch the validation references are the same: the second call tokenises only the candidates and
    skips METEOR's normaliser, and every score equals a fresh call's (and the first call equals COCOEvalCap)."""
    from lavis_ext.evaluation import meteor_paraphrases

    refs = dict(zip(NON_NUMERIC_IDS, GOLDEN_REFS))
    metrics = ("BLEU", "METEOR", "ROUGE_L", "CIDEr")
    first = evaluate_captions(dict(zip(NON_NUMERIC_IDS, GOLDEN_PREDS)), refs, work_dir=tmp_path / "1", metrics=metrics)
    assert first == golden["ours_a"] and len(cm.REFERENCE_MEMO) == 1
    remembered = cm.REFERENCE_MEMO.get(cm.REFERENCE_MEMO.key(list(GOLDEN_REFS)))
    cut_available = meteor_paraphrases.TableCutter.create(cm._require_java()[0]) is not None
    assert (remembered.word_ids is not None) == cut_available

    next_epoch = dict(zip(NON_NUMERIC_IDS, GOLDEN_PREDS[3:] + GOLDEN_PREDS[:3]))  # other candidates, same references
    tokenised, normalised = [], []
    real_tokenize, real_words = cm.ptb_tokenize, meteor_paraphrases.TableCutter.reference_word_ids
    monkeypatch.setattr(cm, "ptb_tokenize", lambda s, *a, **k: tokenised.append(len(s)) or real_tokenize(s, *a, **k))
    monkeypatch.setattr(meteor_paraphrases.TableCutter, "reference_word_ids",
                        lambda self, *a: normalised.append(1) or real_words(self, *a))
    again = evaluate_captions(next_epoch, refs, work_dir=tmp_path / "2", metrics=metrics)
    assert tokenised == [len(GOLDEN_PREDS)] and normalised == []
    cm.REFERENCE_MEMO.clear()
    fresh = evaluate_captions(next_epoch, refs, work_dir=tmp_path / "3", metrics=metrics)
    assert tokenised[1:] == [sum(map(len, GOLDEN_REFS)) + len(GOLDEN_PREDS)] and len(normalised) == int(cut_available)
    assert again == fresh and again["CIDEr"] != first["CIDEr"]


def test_the_reference_memo_keeps_the_last_few_sets_and_their_meteor_words():
    import numpy as np

    memo = cm._ReferenceMemo(size=2)
    a, b, c = (memo.key(refs) for refs in ([["a cat"]], [["a dog"]], [["a cow"], ["a|||b"]]))
    memo.put(a, {0: ["a cat"]}, np.array([1, -1]))
    memo.put(a, {0: ["a cat"]})  # a call without METEOR does not forget the words
    assert memo.get(a).word_ids.tolist() == [1, -1] and not memo.get(a).word_ids.flags.writeable
    memo.put(b, {0: ["a dog"]})
    memo.get(a)  # a is now the most recent
    memo.put(c, {0: ["a cow"], 1: ["a b"]})
    assert memo.get(b) is None and memo.get(a) is not None and memo.get(c).gts[1] == ["a b"]
    assert memo.key([["a cat", ""]]) != a and memo.get(memo.key([["a cat", ""]])) is None  # every string counts


@needs_java
def test_references_and_candidates_tokenised_in_one_jvm_equal_two_calls(tmp_path):
    refs = [TRICKY[:4], TRICKY[4:9], TRICKY[9:]]
    gts, res = cm._tokenise_all(refs, TRICKY[:3], str(tmp_path), "java")
    assert [gts[i] for i in range(3)] == [cm.ptb_tokenize(r, tmp_path) for r in refs]
    assert [res[i][0] for i in range(3)] == cm.ptb_tokenize(TRICKY[:3], tmp_path)


def test_missing_java_on_path_fails_before_any_work(tmp_path, monkeypatch):
    """The user's situation, not a mocked lookup: PATH without java, then a java that cannot run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(RuntimeError, match=r"`java` is not on PATH.*apt-get install openjdk"):
        evaluate_captions({1: "a cat"}, {1: ["a cat"]}, work_dir=tmp_path / "work")
    assert not (tmp_path / "work").exists()  # checked before the work dir, the tokenizer or METEOR
    broken = bin_dir / "java"
    broken.write_text("#!/bin/sh\necho 'Error: could not find libjava.so' >&2\nexit 3\n")
    broken.chmod(0o755)
    with pytest.raises(RuntimeError, match=r"-version` exited with 3: Error: could not find libjava\.so"):
        evaluate_captions({1: "a cat"}, {1: ["a cat"]}, work_dir=tmp_path / "work")
    with pytest.raises(RuntimeError, match="exited with 3"):
        best_constant_caption({1: ["a cat"]})
    assert not (tmp_path / "work").exists()


@needs_java
def test_meteor_process_reports_a_jvm_that_dies(tmp_path):
    meteor = cm._MeteorProcess("java", str(tmp_path), timeout=300)
    meteor.proc.kill()
    with pytest.raises(RuntimeError, match=r"METEOR failed"):
        meteor.score({0: ["a cat"]}, {0: ["a cat"]})
    meteor.close()  # idempotent
    assert meteor.proc.poll() is not None and list(tmp_path.iterdir()) == []


@needs_java
def test_one_summed_eval_line_gives_the_score_of_all_statistics_lines(tmp_path):
    # perfect single-chunk segments (their chunk is not counted), partial matches, synonyms, an empty hypothesis
    refs = [["a dog runs on the grass"], ["two cats sleep on a red sofa", "cats on a couch"], ["a man rides a horse"],
            ["a big automobile parked next to the flag"], ["the quick brown fox jumps"], ["a plate of food"]]
    hyps = ["a dog runs on the grass", "two cats sleeping on a couch", "a horse ridden by a man",
            "a large car parked by a flag", "", "a plate of food"]
    lines = cm._meteor_score_lines(dict(enumerate(refs)), {i: [h] for i, h in enumerate(hyps)})
    process = cm._MeteorProcess("java", str(tmp_path), timeout=300)
    try:
        stats = process.statistics(lines)
        assert cm._summed_statistics(stats) is not None
        one_line = process.evaluate(stats)
        process.proc.stdin.write(("EVAL" + "".join(f" ||| {s}" for s in stats) + "\n").encode())  # pycocoevalcap's
        process.proc.stdin.flush()
        for _ in stats:
            process.proc.stdout.readline()
        every_line = float(process.proc.stdout.readline())
    finally:
        process.close()
    assert one_line == every_line
    assert 0 < one_line < 1


def test_statistics_that_are_not_whole_numbers_are_not_summed():
    line = " ".join(["2.0"] * 23)
    assert cm._summed_statistics([line, line]) is not None
    assert cm._summed_statistics([line.replace("2.0", "0.5", 1)]) is None
    assert cm._summed_statistics([line, "1.0 2.0"]) is None
    assert cm._summed_statistics([]) is None

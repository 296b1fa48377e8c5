"""METEOR's paraphrase table cut per evaluation (lavis_ext.evaluation.meteor_paraphrases).

The claim under test: the cut table changes no METEOR statistic, and it is the table METEOR's own FilterParaphrase
tool writes for the same references. Real METEOR 1.5 jar and table, real JVMs.
"""
from __future__ import annotations

import gzip
import logging
import shutil
import subprocess

import pytest

from lavis_ext.evaluation import caption_metrics as cm
from lavis_ext.evaluation import text_server
from lavis_ext.evaluation import evaluate_captions
from lavis_ext.evaluation import meteor_paraphrases as mp

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="needs a Java runtime")
needs_javac = pytest.mark.skipif(shutil.which("javac") is None, reason="needs a JDK (javac) for the cut table")

# Pairs the table links ("big"/"large", "automobile"/"car", "kid"/"child", "a lot of"/"much", ...), plus what
# METEOR's normaliser rewrites: capitals, "u.s." -> "us", "x-ray" -> "x ray", "don't" -> "don 't", numbers,
# entities, and a "|||" inside a reference (METEOR splits the line there).
REFERENCES = [
    ["A big automobile parked next to the U.S. flag.", "a large car is parked by a flag"],
    ["a kid holding an x-ray", "the child holds an X-Ray, smiling"],
    ["There is a lot of snow; don't go out.", "much snow &quot;everywhere&quot;"],
    ["3.5 million people -- a big crowd", "a huge crowd of people ||| many people"],
    ["a man riding a horse", "a person on a horse"],
]
HYPOTHESES = [
    "a large car next to the us flag",
    "a child holding an x ray",
    "there is much snow , do not go out",
    "3.5 million persons , a large crowd",
    "a guy rides a horse",
]


def _lines():
    return cm._meteor_score_lines({i: refs for i, refs in enumerate(REFERENCES)},
                                  {i: [hyp] for i, hyp in enumerate(HYPOTHESES)})


def _statistics(tmp_path, table):
    process = cm._MeteorProcess("java", str(tmp_path), timeout=300, paraphrase_table=table)
    try:
        return process.statistics(_lines())
    finally:
        process.close()


@needs_java
@needs_javac
def test_cut_table_gives_the_statistics_of_the_full_table(tmp_path):
    java, _ = cm._require_java()
    cut = mp.table_for(_lines(), tmp_path, java)
    assert cut is not None
    empty = tmp_path / "empty.gz"
    with gzip.open(empty, "wb"):
        pass
    full_stats = _statistics(tmp_path, None)
    assert _statistics(tmp_path, cut) == full_stats
    # not vacuous: without paraphrases some caption scores differently
    assert _statistics(tmp_path, empty) != full_stats
    with gzip.open(cut, "rb") as f:
        kept = f.read().count(b"\n") // 3
    assert 0 < kept < 100_000  # of 5.3 M entries


@needs_java
@needs_javac
def test_cut_table_is_the_one_meteors_filter_tool_writes(tmp_path):
    # FilterParaphrase normalises without punctuation; on plain lower-case words both normalisations agree.
    plain = ["a big automobile parked next to a flag", "a kid holding a lot of toys", "two men on a sofa"]
    lines = [f"SCORE ||| {ref} ||| a hypothesis" for ref in plain]
    java, _ = cm._require_java()
    ours = mp.table_for(lines, tmp_path, java)
    (tmp_path / "refs.txt").write_text("\n".join(plain) + "\n")
    subprocess.run(["java", "-cp", str(mp.meteor_jar()), "FilterParaphrase", str(mp.full_table()),
                    str(tmp_path / "official.gz"), str(tmp_path / "refs.txt")], check=True, capture_output=True)
    with gzip.open(ours, "rb") as a, gzip.open(tmp_path / "official.gz", "rb") as b:
        assert a.read() == b.read()


@needs_java
def test_without_javac_meteor_loads_the_full_table_with_the_same_score(tmp_path, monkeypatch, caplog):
    refs = {i: r for i, r in enumerate(REFERENCES)}
    preds = {i: h for i, h in enumerate(HYPOTHESES)}
    cut = evaluate_captions(preds, refs, metrics=["METEOR"], work_dir=tmp_path / "cut")["METEOR"]
    monkeypatch.setenv("LAVIS_EXT_CACHE", str(tmp_path / "empty_cache"))  # no compiled helper there
    monkeypatch.setattr(mp.text_server, "_javac_for", lambda java: None)
    monkeypatch.setattr(mp, "_warned", set())
    with caplog.at_level(logging.WARNING, logger=mp.__name__):
        assert mp.table_for(_lines(), tmp_path, "java") is None
        full = evaluate_captions(preds, refs, metrics=["METEOR"], work_dir=tmp_path / "full")["METEOR"]
    assert "javac" in caplog.text and "full paraphrase table" in caplog.text
    assert full == cut
    assert not list((tmp_path / "empty_cache").rglob("paraphrase-en-*"))  # nothing indexed without the helper


@needs_java
def test_an_unwritable_cache_falls_back_to_the_full_table(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("LAVIS_EXT_CACHE", str(blocker))
    monkeypatch.setattr(mp, "_warned", set())
    with caplog.at_level(logging.WARNING, logger=mp.__name__):
        assert mp.table_for(_lines(), tmp_path, "java") is None
    assert "full paraphrase table" in caplog.text and str(blocker) in caplog.text


@needs_java
@needs_javac
def test_meteor_in_the_text_server_answers_what_its_own_jvm_answers(tmp_path):
    """The warm server runs Meteor.main on files: the same statistics and EVAL score as a METEOR JVM of its own,
    on lines where paraphrases, stems and synonyms fire; both slots, and again once warm."""
    java, _ = cm._require_java()
    table = mp.table_for(_lines(), tmp_path, java)
    lines = _lines() * 3
    own = cm._MeteorProcess(java, str(tmp_path), timeout=300, paraphrase_table=table)
    try:
        expected = own.statistics(lines)
        score = own.evaluate(expected)
    finally:
        own.close()
    for slot in (0, 1, 0):
        served = cm._ServedMeteor(java, str(tmp_path), 300, table, slot)
        assert served.statistics(lines) == expected
        assert served.evaluate(expected) == score
    assert len({text_server.server_for(java, s)._proc.pid for s in (0, 1)}) == 2  # two JVMs, both kept
    assert sorted(p.name for p in tmp_path.iterdir()) == [table.name]  # its files are gone

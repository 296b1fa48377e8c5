"""The caption text server: the PTB tool's output byte for byte, one warm JVM across calls, and recovery."""
from __future__ import annotations

import random
import shutil
import subprocess
import warnings

import pytest

from lavis_ext.evaluation import caption_metrics as cm
from lavis_ext.evaluation import text_server

pytestmark = pytest.mark.skipif(shutil.which("java") is None or shutil.which("javac") is None,
                                reason="needs a JDK (java and javac)")

CAPTIONS = [
    "A man's hat, isn't it?", 'He said "hello" (twice) -- then left...', "Two-year-old child; 3.5 km/h: wow!",
    "ROCK 'n' roll `quoted` {braces} [brackets]", "  leading and trailing spaces  ", "", "...",
    "café naïve résumé", "U.S.A. Dr. Smith's cat's toys", "can't won't I'm we'll they'd",
    "e-mail & co. 50% off $20 -- well-known", "日本語 の キャプション", "tab\there", "emoji 🐱 cat",
]


def _cli(path) -> bytes:
    """pycocoevalcap's command line, run on its own."""
    jar = text_server.jars()[0]
    return subprocess.run(["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                           "-lowerCase", str(path)], capture_output=True, check=True).stdout


def test_the_server_writes_what_the_command_line_tool_prints(tmp_path):
    rng = random.Random(0)
    words = [w for c in CAPTIONS for w in c.split(" ")]
    lines = CAPTIONS + [" ".join(rng.choice(words) for _ in range(rng.randint(1, 14))) for _ in range(500)]
    server = text_server.server_for("java")
    for i in range(2):  # the second request runs in the same, now warm, JVM
        source = tmp_path / f"in{i}.txt"
        source.write_text("\n".join(lines[i:]), encoding="utf-8")
        server.tokenize(source, tmp_path / f"out{i}.txt", timeout=120)
        assert (tmp_path / f"out{i}.txt").read_bytes() == _cli(source)
        pid = server._proc.pid if i == 0 else pid
    assert server._proc.pid == pid and text_server.server_for("java") is server


def test_an_error_answer_leaves_the_server_running_and_a_dead_one_is_replaced(tmp_path):
    server = text_server.server_for("java")
    (tmp_path / "in.txt").write_text("A cat.\n")
    server.tokenize(tmp_path / "in.txt", tmp_path / "out.txt", timeout=120)
    pid = server._proc.pid
    with pytest.raises(text_server.TextServerError, match="unknown request"):
        server._request(["NOPE"], timeout=60)
    with pytest.raises(text_server.TextServerError, match="Unable to resolve"):
        server.tokenize(tmp_path / "missing.txt", tmp_path / "out.txt", timeout=60)
    assert server._proc.pid == pid  # still the same JVM
    server._proc.kill()
    server._proc.wait()
    server.tokenize(tmp_path / "in.txt", tmp_path / "again.txt", timeout=120)  # a new JVM takes over
    assert server._proc.pid != pid and (tmp_path / "again.txt").read_text().strip() == "a cat ."


def test_a_silent_server_is_stopped_at_the_timeout(tmp_path):
    server = text_server.TextServer("java", text_server.compiled_classes("java"))
    try:
        (tmp_path / "in.txt").write_text("\n".join(CAPTIONS * 2000))
        with pytest.raises(text_server.TextServerError, match="did not answer within"):
            server.tokenize(tmp_path / "in.txt", tmp_path / "out.txt", timeout=0.05)  # still starting its JVM
        assert server._proc is None
        server.tokenize(tmp_path / "in.txt", tmp_path / "out.txt", timeout=120)
        assert (tmp_path / "out.txt").read_bytes() == _cli(tmp_path / "in.txt")
    finally:
        server.close()


def test_ptb_tokenize_falls_back_to_the_command_line_tool(tmp_path, monkeypatch):
    served = cm.ptb_tokenize(CAPTIONS, tmp_path)

    def broken(*args, **kwargs):
        raise text_server.TextServerError("the caption text server died (test)")

    monkeypatch.setattr(text_server.TextServer, "tokenize", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cm.ptb_tokenize(CAPTIONS, tmp_path) == served
    assert any("JVM of its own" in str(w.message) for w in caught)
    monkeypatch.setattr(text_server, "_servers", {})
    monkeypatch.setattr(text_server, "_javac_for", lambda java: None)
    monkeypatch.setenv("LAVIS_EXT_CACHE", str(tmp_path / "no_javac_cache"))
    with pytest.raises(text_server.TextServerError, match="javac"):
        text_server.server_for("java")
    assert cm.ptb_tokenize(CAPTIONS, tmp_path) == served  # a JRE alone: the command-line tool
    assert not list(tmp_path.glob("ptb_*"))  # its temporary files are gone


def test_meteor_falls_back_to_a_jvm_of_its_own_with_the_same_score(tmp_path, monkeypatch):
    refs = {i: [f"a big car number {i} parked", "a large automobile by a flag"] for i in range(4)}
    preds = {i: "a large car parked next to a flag" for i in range(4)}
    served = cm.evaluate_captions(preds, refs, metrics=["METEOR"], work_dir=tmp_path / "a")["METEOR"]

    def broken(*args, **kwargs):
        raise text_server.TextServerError("the caption text server died (test)")

    monkeypatch.setattr(text_server.TextServer, "meteor", broken)
    cm.REFERENCE_MEMO.clear()
    with pytest.warns(RuntimeWarning, match="METEOR's (scoring|EVAL) runs in a JVM of its own") as caught:
        own = cm.evaluate_captions(preds, refs, metrics=["METEOR"], work_dir=tmp_path / "b")["METEOR"]
    assert {m for m in ("scoring", "EVAL") for w in caught if f"METEOR's {m}" in str(w.message)} == {"scoring", "EVAL"}
    assert own == served

"""`lavis-ext reproduce` end to end at the micro size: every arm of the three ablations trains and tests
through the real entry point (1 seed, a few steps), the later stages start from the earlier ones'
checkpoints, and the table, CSV and plot hold one row per arm; a second call skips every finished arm."""
from __future__ import annotations

import csv
import io
import json

import pytest

from lavis_ext import cli, report, reproduce


@pytest.fixture(scope="module")
def micro(synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    code = cli.main(["reproduce", "--size", "micro", "--out", str(out)])
    return out, code


def test_every_arm_runs_and_the_results_have_one_row_per_arm(micro):
    out, code = micro
    assert code == 0
    for arm in reproduce.ARMS:
        run = reproduce.run_dir(out, arm, 42)
        assert reproduce.is_done(run), arm
        side = json.loads((run / reproduce.SIDE_FILE).read_text())
        assert side["wall_s"] > 0 and side["trainable_params"] > 0
        pretrained = report._logged_config(run)["model"]["pretrained"]
        if arm.init_from:  # the later stage really started from the earlier stage's checkpoint of its seed
            source = next(a for a in reproduce.ARMS if (a.ablation, a.name) == arm.init_from)
            assert pretrained.startswith(str(reproduce.run_dir(out, source, 42))), pretrained
        else:
            assert pretrained is None

    rows = list(csv.DictReader(io.StringIO((out / "results.csv").read_text())))
    labels = {f"{a.ablation}: {a.label}" for a in reproduce.ARMS}
    assert {r["group"] for r in rows if r["kind"] == "run"} == labels
    assert {r["group"] for r in rows if r["kind"] == "mean"} == labels
    assert all(r["seed"] == "42" for r in rows if r["kind"] == "run")
    by_group = {r["group"]: r for r in rows if r["kind"] == "run"}
    assert float(by_group["stage1: stage 2 from scratch"]["CIDEr"]) >= 0
    for label in ("ITC", "ITC+ITM", "ITC+ITM+ITG"):  # protocol recall and the ITC-only ranking's, per arm
        row = by_group[f"losses: {label}"]
        assert all(0 <= float(row[m]) <= 100 for m in ("txt_r1", "img_r5", "itc_txt_r1", "itc_img_r5"))
    # LoRA trains fewer parameters than the full LLM and more than the frozen one
    params = {name: float(by_group[f"llm: {label}"]["trainable_k"]) for name, label in (
        ("frozen", "caption-trained LLM frozen"), ("lora", "caption-trained LLM + LoRA r16"),
        ("full", "caption-trained LLM fully fine-tuned"))}
    assert params["frozen"] < params["lora"] < params["full"]

    table = (out / "results.md").read_text()
    for arm in reproduce.ARMS:
        assert f"| {arm.label} | 1 | 42 |" in table
    assert (out / "results.png").stat().st_size > 10_000


def test_finished_arms_are_skipped(micro, capsys):
    out, _ = micro
    before = {arm: (reproduce.run_dir(out, arm, 42) / reproduce.SIDE_FILE).read_text() for arm in reproduce.ARMS}
    assert reproduce.main(["--size", "micro", "--out", str(out), "--ablations", "llm"]) == 0
    assert "already done" not in capsys.readouterr().out  # logged, not printed; the side files tell
    for arm, text in before.items():
        assert (reproduce.run_dir(out, arm, 42) / reproduce.SIDE_FILE).read_text() == text
    assert "## llm" in (out / "results.md").read_text() and "## losses" not in (out / "results.md").read_text()


def test_bad_arguments_name_the_value(capsys):
    with pytest.raises(SystemExit):
        reproduce.main(["--jobs", "0"])
    assert "--jobs 0" in capsys.readouterr().err

"""`lavis-ext report` on real runs: a 2-seed sweep of one setting plus one run of another."""
from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

import pytest

from lavis_ext import cli, report
from tiny_models import QUICK

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sweep(synthetic_root, tmp_path_factory) -> Path:
    """runs/<setting>/seed<k>/<job>: lr 1e-3 with seeds 1 and 2, lr 3e-3 with seed 1 (tiny T5 VQA, 4 steps)."""
    root = tmp_path_factory.mktemp("sweep")
    for lr, seed in (("1e-3", 1), ("1e-3", 2), ("3e-3", 1)):
        cli.train([
            "--cfg-path", str(REPO / "projects/tiny/vqa_t5.yaml"), "--options", *QUICK, "run.log_freq=1",
            f"run.output_dir={root / f'lr{lr}' / f'seed{seed}'}", f"run.seed={seed}", f"run.init_lr={lr}",
            "run.valid_splits=[]", "datasets.wds_vqa.build_info.lengths.train=64",
            "datasets.wds_vqa.build_info.lengths.test=32",
        ])
    return root


def _test_metrics(run_dir: Path) -> dict:
    return json.loads(next(run_dir.glob("test_epoch*_metrics.json")).read_text())["metrics"]


def test_runs_are_grouped_by_config_and_summarised(sweep, tmp_path, capsys):
    code = cli.main(["report", str(sweep), "--markdown", str(tmp_path / "r.md"), "--csv", str(tmp_path / "r.csv"),
                     "--plot", str(tmp_path / "curves.png")])
    assert code == 0
    runs = [report.load_run(p, "test") for p in report.find_runs([sweep], "test")]
    assert len(runs) == 3
    groups = report.group_runs(runs)
    assert sorted(groups) == ["run.init_lr=0.001", "run.init_lr=0.003"]
    pair = groups["run.init_lr=0.001"]
    assert sorted(r.seed for r in pair) == [1, 2]
    overall = [_test_metrics(r.path)["overall"] for r in pair]

    rows = list(csv.DictReader(io.StringIO((tmp_path / "r.csv").read_text())))
    mean = next(r for r in rows if r["kind"] == "mean" and r["group"] == "run.init_lr=0.001")
    std = next(r for r in rows if r["kind"] == "std" and r["group"] == "run.init_lr=0.001")
    assert float(mean["overall"]) == pytest.approx(statistics.fmean(overall))
    assert float(std["overall"]) == pytest.approx(statistics.stdev(overall))
    assert len([r for r in rows if r["kind"] == "run"]) == 3

    table = (tmp_path / "r.md").read_text()
    assert table in capsys.readouterr().out
    assert f"{statistics.fmean(overall):.4g} ± {statistics.stdev(overall):.2g}" in table
    assert "(n/a: 1 run)" in table  # the single lr=3e-3 run has no spread
    assert (tmp_path / "curves.png").stat().st_size > 5000


def test_one_run_directory_and_bad_requests(sweep):
    run_dir = next((sweep / "lr1e-3" / "seed1").iterdir())
    assert report.find_runs([run_dir], "test") == [run_dir]
    runs = [report.load_run(run_dir, "test")]
    assert list(report.group_runs(runs)) == ["all runs"]
    assert "train/loss" in report.read_scalars(run_dir)
    with pytest.raises(FileNotFoundError, match="no 'val' metrics"):
        report.find_runs([sweep], "val")
    with pytest.raises(KeyError, match="CIDEr"):
        report._metric_names(runs, ["CIDEr"])


def test_nested_vqa_figures_and_ignored_keys(sweep, capsys):
    """Per-type VQA accuracy (nested in the metrics file) is reported as dotted names; `--ignore KEY` merges
    groups that differ only in KEY (e.g. each seed fine-tuned from its own checkpoint: model.pretrained)."""
    runs = [report.load_run(p, "test") for p in report.find_runs([sweep], "test")]
    for run in runs:
        nested = _test_metrics(run.path)["per_answer_type"]
        assert nested and all(run.metrics[f"per_answer_type.{k}"] == v for k, v in nested.items())
    assert len(report.group_runs(runs)) == 2 and list(report.group_runs(runs, ["run.init_lr"])) == ["all runs"]
    assert report.main([str(sweep), "--ignore", "run.init_lr", "--metrics", "overall", "per_answer_type.other"]) == 0
    assert "| all runs | 3 |" in capsys.readouterr().out

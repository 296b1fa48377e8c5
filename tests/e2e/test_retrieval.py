"""Image-text retrieval end to end: the task guide's worked example (its files and its command), a short
tiny stage-1 training with retrieval evaluation, and 2-process evaluation equal to 1 process.

The 2-process run splits the test split's shards over the ranks (4 shards of 8 images, 2 per rank) and
batches them differently from the single process (batch 6 straddles shards), so the equality covers the
gathering, the global ordering and the ITM split, not only identical batches.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from lavis.common.registry import registry
from test_distributed import finish, only_run  # the DDP tests' launch helpers

from lavis_ext import cli

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "docs" / "adding_a_task.md"
SHORT = [  # the guide's command, shortened: 10 steps, a small k
    "run.max_epoch=1", "run.num_workers=0", "run.warmup_steps=2", "run.batch_size_train=16",
    "datasets.wds_caption.build_info.lengths.train=160", "run.k_test=8", "run.val_freq=1",
]
EVAL = ["run.num_workers=0", "run.k_test=8", "run.batch_size_eval=6"]
RECALL_KEYS = {"txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "txt_r_mean", "img_r_mean", "r_mean", "agg_metrics"}


def worked_example() -> str:
    return GUIDE.read_text().split("## Worked example", 1)[1]


def guide_command() -> list[str]:
    """The worked example's command (its last bash block)."""
    blocks = re.findall(r"```bash\n(.*?)```", worked_example(), re.S)
    (line,) = [line for line in blocks[-1].splitlines() if line.strip()]
    return shlex.split(line)


def test_the_worked_example_lists_files_that_exist_and_register_the_task():
    files = re.findall(r"^- `([^`]+)`", worked_example(), re.M)
    assert "lavis_ext/tasks/retrieval.py" in files and "projects/tiny/retrieval.yaml" in files
    for path in files:
        assert (REPO / path).is_file(), path
    registration = re.search(r"`lavis_ext/tasks/__init__.py`: `([^`]+)`", worked_example()).group(1)
    assert registration in (REPO / "lavis_ext/tasks/__init__.py").read_text()
    from lavis_ext.tasks.retrieval import RetrievalTaskExt

    assert registry.get_task_class("retrieval_ext") is RetrievalTaskExt


@pytest.fixture(scope="module")
def retrieval_run(synthetic_root, tmp_path_factory) -> Path:
    program, script, *args = guide_command()
    assert (program, script) == ("python", "train.py") and args[0] == "--cfg-path"
    args[1] = str(REPO / args[1])
    out = tmp_path_factory.mktemp("retrieval_run")
    runner = cli.train([*args, "--options", *SHORT, f"run.output_dir={out}"])
    return Path(runner.output_dir)


def read_metrics(path: Path) -> dict:
    return json.loads(path.read_text())


def test_the_guide_command_trains_stage1_and_reports_recalls(retrieval_run):
    for name in ("val_epoch0_metrics.json", "test_epochbest_metrics.json"):
        record = read_metrics(retrieval_run / name)
        assert (record["num_images"], record["num_texts"], record["k_test"]) == (32, 160, 8)  # 5 captions per image
        metrics = record["metrics"]
        assert set(metrics) == RECALL_KEYS
        assert all(0.0 <= metrics[k] <= 100.0 for k in RECALL_KEYS)
        assert metrics["txt_r1"] <= metrics["txt_r5"] <= metrics["txt_r10"]
        assert metrics["img_r1"] <= metrics["img_r5"] <= metrics["img_r10"]


def test_two_process_evaluation_equals_one_process(retrieval_run, synthetic_root, tmp_path):
    project = str(REPO / "projects/tiny/retrieval.yaml")
    _, results = cli.evaluate(["--cfg-path", project, "--checkpoint", str(retrieval_run), "--options", *EVAL,
                               f"run.output_dir={tmp_path / 'one'}"])
    one = results["test"]
    out = tmp_path / "two"
    out.mkdir()
    env = {**os.environ, "LAVIS_EXT_DATA": str(synthetic_root), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(REPO / "evaluate.py"),
           "--cfg-path", project, "--checkpoint", str(retrieval_run), "--options", *EVAL, f"run.output_dir={out}"]
    finish(subprocess.Popen(cmd, cwd=out, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
    two = read_metrics(only_run(out) / "test_epochbest_metrics.json")
    assert (two["num_images"], two["num_texts"]) == (32, 160)
    assert two["metrics"] == one

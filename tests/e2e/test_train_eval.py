"""The real entry points on tiny models and shards: train + eval in-process, resume, torchrun x2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lavis_ext import cli
from tiny_models import QUICK
from lavis_ext.config import ConfigError

REPO = Path(__file__).resolve().parents[2]


def shard_options(root: Path, dataset: str = "wds_caption") -> list[str]:
    return [f"datasets.{dataset}.build_info.root={root}"]


def metrics_of(run_dir: Path, split: str, epoch="best") -> dict:
    return json.loads((run_dir / f"{split}_epoch{epoch}_metrics.json").read_text())


def test_train_then_test_through_train_py(synthetic_root, tmp_path):
    runner = cli.train(
        ["--cfg-path", str(REPO / "projects/tiny/caption_opt.yaml"), "--options", *QUICK,
         f"run.output_dir={tmp_path}", *shard_options(synthetic_root)]
    )
    run_dir = Path(runner.output_dir)
    assert run_dir.is_relative_to(tmp_path)
    record = metrics_of(run_dir, "test")
    assert record["num_images"] == 32
    for key in ("Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "agg_metrics"):
        assert key in record["metrics"]
    assert "SPICE" in record["skipped"]
    results = json.loads((run_dir / "result" / "test_epochbest.json").read_text())
    assert len(results) == 32 and set(results[0]) == {"image_id", "caption"}
    assert (run_dir / "curves.png").stat().st_size > 1000
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "checkpoint_best.safetensors").exists() or (run_dir / "checkpoint_0.safetensors").exists()
    assert "Train: data epoch" not in (run_dir / "run.log").read_text()  # our loop, not LAVIS's
    assert "Qformer" in (run_dir / "parameters.txt").read_text()
    from lavis_ext.summary import summarise

    assert summarise(tmp_path)["metrics"]["CIDEr"] == record["metrics"]["CIDEr"]


def test_resume_from_checkpoint_continues_at_next_epoch(synthetic_root, tmp_path):
    base = ["--cfg-path", str(REPO / "projects/tiny/caption_opt.yaml"), "--options", *QUICK,
            *shard_options(synthetic_root), "run.valid_splits=[]", "run.test_splits=[]"]
    first = cli.train(base + [f"run.output_dir={tmp_path / 'a'}"])
    ckpt = Path(first.output_dir) / "checkpoint_0.safetensors"
    assert ckpt.exists()
    second = cli.train(base + [f"run.output_dir={tmp_path / 'b'}", "run.max_epoch=2", f"run.resume_ckpt_path={ckpt}"])
    assert second.start_epoch == 1
    assert (Path(second.output_dir) / "checkpoint_1.safetensors").exists()
    assert not (Path(second.output_dir) / "checkpoint_0.safetensors").exists()


def test_unknown_run_key_fails_before_any_work(synthetic_root, tmp_path):
    with pytest.raises(ConfigError, match=r"'max_epochs'.*'max_epoch'"):
        cli.train(["--cfg-path", str(REPO / "projects/tiny/caption_opt.yaml"), "--options",
                   "run.max_epochs=3", f"run.output_dir={tmp_path}"])
    assert not any(tmp_path.iterdir())


def test_missing_shards_fail_before_training_with_the_pattern(synthetic_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        cli.train(["--cfg-path", str(REPO / "projects/tiny/caption_opt.yaml"), "--options", *QUICK,
                   f"run.output_dir={tmp_path}", f"datasets.wds_caption.build_info.root={tmp_path / 'nowhere'}"])


def test_vqa_t5_train_and_score(synthetic_root, tmp_path):
    runner = cli.train(
        ["--cfg-path", str(REPO / "projects/tiny/vqa_t5.yaml"), "--options", *QUICK[:-1], "run.max_len=3",
         f"run.output_dir={tmp_path}", *shard_options(synthetic_root, "wds_vqa")]
    )
    record = metrics_of(Path(runner.output_dir), "test")
    assert record["num_questions"] > 32
    assert 0.0 <= record["metrics"]["overall"] <= 100.0


def test_vqa_finetuning_lifts_accuracy_far_above_the_untrained_model(synthetic_root, tmp_path):
    """OPT with the paper's VQA recipe in miniature (weighted answers, question into the Q-Former)."""
    # from scratch: the LR of training from nothing (the recipe's 3e-4 is for fine-tuning a caption checkpoint)
    options = [*QUICK[:-1], "run.max_len=3", "run.max_epoch=3", "run.warmup_steps=30", "run.valid_splits=[]",
               "run.init_lr=1.5e-3", "run.min_lr=1e-4",
               *shard_options(synthetic_root, "wds_vqa")]
    project = ["--cfg-path", str(REPO / "projects/tiny/vqa_opt.yaml"), "--options", *options]
    untrained, _ = cli.evaluate(project + [f"run.output_dir={tmp_path / 'untrained'}", "run.evaluate=true"])
    trained = cli.train(project + [f"run.output_dir={tmp_path / 'trained'}"])
    before = metrics_of(Path(untrained.output_dir), "test", epoch="best")["metrics"]["overall"]
    (test_file,) = Path(trained.output_dir).glob("test_epoch*_metrics.json")  # no validation: the last epoch
    after = json.loads(test_file.read_text())["metrics"]["overall"]
    assert before < 5.0
    assert after > before + 25.0, (before, after)


@pytest.mark.slow
def test_vqa_recipe_from_a_caption_run_answers_from_the_image(tmp_path, monkeypatch):
    """The documented VQA recipe (vqa_opt.yaml's header): the caption demo's recipe on the full synthetic set, then
    VQA fine-tuning from its checkpoint. Seed 42 measured 70.0 overall / 63.6 other (3 seeds in the yaml's header).
    Seeds 43/44 gave 60.2/51.4 and 69.1/63.8, so other CPUs' kernels (a seed change in effect) get the same room:
    >= 60 / >= 50. From scratch this yaml scores at most 52.4 / 41.5 here, so the bar needs the image."""
    from lavis_ext.datasets.synthetic import generate_dataset

    root = tmp_path / "synthetic"
    generate_dataset(root, seed=0, tokenizers=True)  # the full set: 4000 train images, 16000 questions
    monkeypatch.setenv("LAVIS_EXT_DATA", str(root))  # the tiny models' tokenizers and the builders' root
    vit = "model.vit_config={patch_size: 16, width: 96, depth: 4, heads: 4, mlp_ratio: 4.0}"  # as vqa_opt.yaml
    caption = cli.train(["--cfg-path", str(REPO / "projects/tiny/caption_opt.yaml"), "--options", vit,
                         "run.max_epoch=20", "run.val_freq=5",  # the measured caption runs
                         f"run.output_dir={tmp_path / 'caption'}", "run.test_splits=[]"])
    checkpoint = Path(caption.output_dir) / "checkpoint_best.safetensors"
    assert checkpoint.is_file()
    vqa = cli.train(["--cfg-path", str(REPO / "projects/tiny/vqa_opt.yaml"), "--options",
                     f"run.output_dir={tmp_path / 'vqa'}", "model.load_pretrained=true", f"model.pretrained={checkpoint}"])
    metrics = metrics_of(Path(vqa.output_dir), "test")["metrics"]
    assert metrics["overall"] >= 60.0 and metrics["per_answer_type"]["other"] >= 50.0, metrics


def test_two_process_torchrun_merges_every_rank(synthetic_root, tmp_path):
    env = {**os.environ, "LAVIS_EXT_DATA": str(synthetic_root), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "train.py"), "--cfg-path", str(REPO / "projects/tiny/caption_opt.yaml"), "--options", *QUICK,
           f"run.output_dir={tmp_path}", *shard_options(synthetic_root), "run.valid_splits=[]"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    record = metrics_of(run_dir, "test", epoch=0)
    assert record["num_images"] == 32  # both ranks' halves, merged once on rank 0
    assert {p.name for p in (run_dir / "result").glob("test_epoch0_rank*.json")} == {"test_epoch0_rank0.json", "test_epoch0_rank1.json"}

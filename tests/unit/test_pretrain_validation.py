"""Pretraining validation (image_text_pretrain_ext): the mean (image, caption) loss of a held-out caption split.

The recipes' "set valid_splits to a held-out shard split" used to crash stage 1 and stage 2 with
KeyError: 'text_input' (evaluation splits give one sample per image with a `captions` list).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from lavis.common.registry import registry
from lavis.processors.blip_processors import BlipCaptionProcessor, BlipImageEvalProcessor
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from lavis_ext import cli
from lavis_ext.datasets.wds_pipeline import WdsSplitDataset
from lavis_ext.tasks.pretrain import PretrainTaskExt
from tiny_models import QUICK, retask, tiny_model

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def output_dir(tmp_path, monkeypatch):
    monkeypatch.setitem(registry.mapping["paths"], "output_dir", str(tmp_path))
    return tmp_path


def val_loader(root: Path, batch_size: int = 4) -> DataLoader:
    """The first val shard (8 images, 5 captions each) in evaluation mode, 4 images per batch."""
    dataset = WdsSplitDataset("val/shard-000000.tar", "caption_eval", root=root, length=8,
                              vis_processor=BlipImageEvalProcessor(image_size=64))
    dataset.pair_text_processor = BlipCaptionProcessor(prompt="a picture of ")  # what build_datasets attaches
    return DataLoader(dataset, batch_size=batch_size, collate_fn=dataset.collater)


def by_hand(model, loader, seed: int) -> tuple[float, int]:
    """The definition in lavis_ext.tasks.pretrain, written out: batch j of an evaluation batch pairs each image
    with its j-th caption (train text processing), each batch's loss weighted by its pairs."""
    text = BlipCaptionProcessor(prompt="a picture of ")
    total, pairs = 0.0, 0
    with torch.no_grad():
        for k, batch in enumerate(loader):
            torch.manual_seed(seed + k)  # stage 1's ITM negatives: seeded per evaluation batch
            for j in range(5):
                rows = list(range(len(batch["captions"])))
                pair_batch = {"image": batch["image"][rows], "text_input": [text(batch["captions"][i][j]) for i in rows]}
                total += float(model(pair_batch)["loss"]) * len(rows)
                pairs += len(rows)
    return total / pairs, pairs


def validate(model, loader, seed: int = 7) -> dict:
    task = PretrainTaskExt()
    task.run_cfg = OmegaConf.create({"seed": seed})  # as build_model keeps it
    task.before_evaluation(model, loader.dataset)
    return task.after_evaluation(task.evaluation(model, loader), "val", 0)


@pytest.mark.parametrize("arch", ["blip2_opt_ext", "blip2_qformer_ext"])  # stage 2, stage 1
def test_validation_loss_is_the_mean_over_held_out_image_caption_pairs(synthetic_root, output_dir, one_thread, arch):
    if arch == "blip2_qformer_ext" and not dist.is_initialized():
        from lavis_ext.dist import init_distributed

        init_distributed(OmegaConf.create({"device": "cpu"}))  # LAVIS's stage-1 forward asks for the rank
    model = tiny_model(arch, vit_config={"depth": 1}, qformer_config={"num_hidden_layers": 1}).eval()
    loader = val_loader(synthetic_root)
    rng = torch.get_rng_state()
    metrics = validate(model, loader)
    assert torch.equal(torch.get_rng_state(), rng)  # training's random stream is untouched
    expected, pairs = by_hand(model, loader, seed=7)
    assert metrics["loss"] == pytest.approx(expected, rel=1e-6)
    assert metrics["agg_metrics"] == -metrics["loss"]
    record = json.loads((output_dir / "val_epoch0_metrics.json").read_text())
    assert record["num_pairs"] == pairs == 40
    assert validate(model, loader)["loss"] == metrics["loss"]  # the same weights score the same at every validation


def test_a_single_pair_joins_the_previous_batch():
    task = PretrainTaskExt()
    images = torch.arange(3.0).view(3, 1)
    batches = task.pair_batches({"image": images, "captions": [["a", "b", "c"], ["d", "e"], ["f"]], "image_id": ["x", "y", "z"]})
    assert [b["text_input"] for b in batches] == [["a", "d", "f"], ["b", "e", "c"]]
    assert [b["image"].flatten().tolist() for b in batches] == [[0.0, 1.0, 2.0], [0.0, 1.0, 0.0]]
    assert batches[1]["image_id"] == ["x", "y", "x"]
    with pytest.raises(KeyError, match="neither 'text_input' nor 'captions'"):
        task.pair_batches({"image": images, "answers": []})


TINY_DATA = [
    "datasets.wds_caption.build_info.shards.train=train/shard-{000000..000001}.tar",
    "datasets.wds_caption.build_info.shards.val=val/shard-000000.tar",
    "datasets.wds_caption.build_info.lengths.train=32", "datasets.wds_caption.build_info.lengths.val=8",
    "run.task=image_text_pretrain_ext", "run.valid_splits=[val]", "run.test_splits=[]",
]


@pytest.mark.parametrize("project", ["projects/tiny/retrieval.yaml", "projects/tiny/caption_opt.yaml"])  # stage 1, stage 2
def test_a_pretraining_run_validates_on_a_held_out_shard_split(synthetic_root, tmp_path, one_thread, project):
    options = [o for o in QUICK if not o.startswith(("run.num_beams", "run.max_len"))]  # decoding: no generation here
    project = retask(REPO / project, "image_text_pretrain_ext", tmp_path)
    runner = cli.train(["--cfg-path", str(project), "--options", *options, *TINY_DATA, f"run.output_dir={tmp_path}",
                        "model.vit_config.depth=1", "model.qformer_config.num_hidden_layers=1"])
    run_dir = Path(runner.output_dir)
    record = json.loads((run_dir / "val_epoch0_metrics.json").read_text())
    assert record["num_pairs"] == 40 and record["metrics"]["loss"] > 0
    assert (run_dir / "checkpoint_best.safetensors").is_file()  # the lowest loss so far (agg_metrics = -loss < 0)

"""LAION-style streaming: resampled shards, runner_iter, datasets mixed by sample ratio, and exact resume.

The resumed runs follow tests/e2e/test_resume.py: interrupted in-process right after an optimizer step
(where LAVIS_EXT_FAULT_INJECT would SIGKILL), resumed with run.resume=auto, compared bit for bit with a
run never stopped. One torch thread (bitwise comparisons need the same reduction order).
"""
from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from lavis.common.registry import registry
from lavis.processors.blip_processors import BlipImageEvalProcessor
from omegaconf import OmegaConf

from lavis_ext import cli
from lavis_ext.checkpoints import read_checkpoint, read_latest
from lavis_ext.datasets.builders import WdsCaptionBuilder
from lavis_ext.datasets.wds_pipeline import WdsSplitDataset, read_sizes
from lavis_ext.datasets.wds_stream import ResampledWdsDataset
from lavis_ext.runners.loaders import EpochStreamLoader, MixedLoader
from test_resume import Interrupted, assert_bitwise_equal, interrupt_at, the_run_dir

REPO = Path(__file__).resolve().parents[2]
STREAM = str(REPO / "projects/tiny/pretrain_stream.yaml")
VIS = BlipImageEvalProcessor(image_size=64)

# 8 iterations in inner epochs of 4, a step checkpoint every 3: resume points fall mid inner epoch
ITER = [
    "run.max_iters=8", "run.iters_per_inner_epoch=4", "run.batch_size_train=8", "run.warmup_steps=3",
    "run.log_freq=4", "run.valid_splits=[]", "run.test_splits=[]", "run.save_every_steps=3",
    "datasets.wds_caption.shuffle_buffer=16",
    "model.opt_config.num_hidden_layers=1", "model.qformer_config.num_hidden_layers=1", "model.vit_config.depth=1",
]


def stream_options(root: Path, out: Path, *extra: str, workers: int = 0) -> list[str]:
    return ["--cfg-path", STREAM, "--options", *ITER, f"run.num_workers={workers}",
            f"datasets.wds_caption.build_info.root={root}", f"run.output_dir={out}", *extra]


def weights(path: Path) -> dict:
    tensors, _ = read_checkpoint(path)
    return {k: v for k, v in tensors.items() if k.startswith(("model.", "optim."))}


def train_shards(root: Path) -> str:
    return read_sizes(root / "sizes.json")["splits"]["train"]["shards"]


def keys_of(dataset, n: int) -> list:
    it = iter(dataset)
    return [(s["image_id"], s["text_input"]) for s in (next(it) for _ in range(n))]


# ---- the resampled stream ---------------------------------------------------------------------------
def test_resampled_stream_is_endless_seeded_per_reader_and_pass(synthetic_root):
    def stream(**kw):
        kw = {"rank": 0, "world_size": 2, "seed": 3, "shuffle_buffer": 8, **kw}
        return ResampledWdsDataset(train_shards(synthetic_root), "caption_train", root=synthetic_root,
                                   vis_processor=VIS, **kw)

    pairs = 128 * 5  # the split's (image, caption) pairs
    first = keys_of(stream(), pairs + 50)  # more than the split holds: it never ends
    assert len(first) == pairs + 50
    assert max(Counter(first).values()) > 1  # with replacement
    assert keys_of(stream(), 200) == first[:200]  # same (seed, pass, rank, worker): same stream
    assert keys_of(stream(rank=1), 200) != first[:200]
    other_pass = stream()
    other_pass.set_epoch(1)
    assert keys_of(other_pass, 200) != first[:200]
    assert keys_of(stream(seed=4), 200) != first[:200]
    with pytest.raises(ValueError, match="resampled streaming is for training splits"):
        ResampledWdsDataset(train_shards(synthetic_root), "caption_eval", root=synthetic_root)


def test_resampled_stream_counts_bad_shards_and_stops_when_all_are_bad(synthetic_root, tmp_path):
    good = sorted((synthetic_root / "train").glob("shard-*.tar"))[:2]
    bad = tmp_path / "broken.tar"
    bad.write_bytes(b"this is not a tar file" * 10)
    dataset = ResampledWdsDataset([str(p) for p in good] + [str(bad)], "caption_train", vis_processor=VIS, seed=0)
    assert len(keys_of(dataset, 300)) == 300  # the broken shard is drawn, skipped and counted; the stream goes on
    assert dataset.skipped["tar_error"] == 1  # counted once per shard and pass
    with pytest.raises(RuntimeError, match="shards drawn in a row gave no usable sample"):
        keys_of(ResampledWdsDataset([str(bad)], "caption_train", vis_processor=VIS), 1)


def test_builder_picks_the_stream_with_resampled_and_needs_no_length(synthetic_root):
    def build(**info):
        cfg = OmegaConf.merge(
            OmegaConf.load(WdsCaptionBuilder.DATASET_CONFIG_DICT["default"]).datasets.wds_caption,
            {"build_info": {"root": str(synthetic_root), "sizes": None, **info}},
        )
        return WdsCaptionBuilder(cfg).build_datasets()

    shards = {"train": train_shards(synthetic_root), "val": "val/shard-000000.tar"}
    built = build(shards=shards, lengths={"val": 8}, resampled=True)
    assert type(built["train"]) is ResampledWdsDataset and type(built["val"]) is WdsSplitDataset
    with pytest.raises(TypeError, match="length unknown"):
        len(built["train"])
    with pytest.raises(ValueError, match="split 'train' has no length"):
        build(shards=shards, lengths={"val": 8})
    with pytest.raises(ValueError, match="did you mean 'resampled'"):
        build(shards=shards, resample=True)


# ---- the mixer --------------------------------------------------------------------------------------
def test_mixed_loader_draws_by_ratio_and_resumes_exactly():
    def mixer():
        children = [EpochStreamLoader(list(range(100, 107)), None, 7), EpochStreamLoader(list(range(200, 203)), None, 3)]
        return MixedLoader(children, ratios=[3, 1], names=["a", "b"], seed=5, rank=1, steps_per_epoch=10)

    reference = mixer()
    drawn = [next(reference) for _ in range(2000)]
    share_a = sum(b < 200 for b in drawn) / len(drawn)
    assert 0.72 < share_a < 0.78  # 3 : 1
    assert len(reference) == 10

    first = mixer()
    head = [next(first) for _ in range(37)]
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    assert state["mix"]["draws"] == 37 and sum(state["mix"]["counts"]) == 37
    resumed = mixer()
    resumed.load_state_dict(state)
    assert resumed.fast_forward() == sum(c["batches"] for c in state["children"].values())
    assert head + [next(resumed) for _ in range(100)] == drawn[:137]
    with pytest.raises(ValueError, match="positive"):
        MixedLoader([iter([])], ratios=[0])
    with pytest.raises(ValueError, match="trains on one dataset"):
        EpochStreamLoader([1], None, 1).load_state_dict(state)


# ---- runner_iter on the stream ------------------------------------------------------------------------
def test_runner_names_resolve_to_ours():
    from lavis.runners.runner_iter import RunnerIter

    from lavis_ext.runners.runner_iter import RunnerIterExt

    assert registry.get_runner_class("runner_iter") is RunnerIterExt
    assert registry.get_runner_class("runner_iter_lavis") is RunnerIter


def test_runner_iter_on_a_resampled_stream_resumes_bitwise(synthetic_root, tmp_path, monkeypatch, one_thread):
    reference = cli.train(stream_options(synthetic_root, tmp_path / "a"))
    ref_dir = Path(reference.output_dir)
    # inner-epoch checkpoints are named by iteration, as LAVIS's runner_iter names them
    assert {p.name for p in ref_dir.glob("checkpoint_*")} == {
        "checkpoint_4.safetensors", "checkpoint_8.safetensors", "checkpoint_step3.safetensors", "checkpoint_step6.safetensors"}
    _, meta = read_checkpoint(ref_dir / "checkpoint_4.safetensors")
    # a cut pass that is complete is stored as the start of the next one: a resume there replays nothing
    assert meta["ranks"][0]["position"] == {"pass": 1, "batches": 0, "samples": 0, "samples_total": 32}

    interrupt_at(monkeypatch, "step", 7)  # iteration 7; the last checkpoint is step 6 (inner epoch 1, step 2)
    with pytest.raises(Interrupted):
        cli.train(stream_options(synthetic_root, tmp_path / "b"))
    monkeypatch.undo()
    run_dir = the_run_dir(tmp_path / "b")
    assert read_latest(run_dir).name == "checkpoint_step6.safetensors"
    _, meta = read_checkpoint(run_dir / "checkpoint_step6.safetensors")
    assert meta["ranks"][0]["position"] == {"pass": 1, "batches": 2, "samples": 16, "samples_total": 48}
    cli.train(stream_options(synthetic_root, tmp_path / "b", "run.resume=auto"))
    assert_bitwise_equal(weights(run_dir / "checkpoint_8.safetensors"), weights(ref_dir / "checkpoint_8.safetensors"))


def test_runner_iter_rejects_a_partial_last_inner_epoch(synthetic_root, tmp_path):
    with pytest.raises(ValueError, match=r"max_iters=10 is not a multiple of run.iters_per_inner_epoch=4.*max_iters=12"):
        cli.train(stream_options(synthetic_root, tmp_path, "run.max_iters=10"))


# ---- mixing by sample ratio ---------------------------------------------------------------------------
def json_captions(synthetic_root: Path, out: Path, images: int = 16) -> Path:
    """A second training dataset in another format: images copied out of the val shards (other pictures than
    the train shards) with a JSONL of two captions each (json_caption, map-style)."""
    records = []
    (out / "images").mkdir(parents=True)
    for shard in sorted((synthetic_root / "val").glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in sorted(n for n in members if n.endswith(".json")):
                key = name[: -len(".json")]
                (out / "images" / f"{key}.jpg").write_bytes(tar.extractfile(members[f"{key}.jpg"]).read())
                meta = json.load(tar.extractfile(members[name]))
                records += [{"image": f"{key}.jpg", "caption": c} for c in meta["captions"][:2]]
                if len(records) >= 2 * images:
                    break
        if len(records) >= 2 * images:
            break
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return out


def mixed_options(synthetic_root: Path, mine: Path, out: Path, *extra: str, runner: str = "runner_iter") -> list[str]:
    """The stream project plus a json_caption dataset (a dataset's defaults load only when the project file
    names it, so it is added to a copy of the file); wds_caption 3 : json_caption 1."""
    project = out.parent / f"mixed_{runner}.yaml"
    if not project.exists():
        cfg = OmegaConf.load(STREAM)
        cfg.datasets.wds_caption.sample_ratio = 3
        cfg.datasets.json_caption = {"sample_ratio": 1, "build_info": {"image_root": "images", "annotations": {"train": "train.jsonl"}}}
        OmegaConf.save(cfg, project)
    mix = [f"datasets.json_caption.build_info.root={mine}"]
    if runner == "runner_base":  # epochs: a finite shard split of 64 pairs (8 batches) + 32 json pairs (4 batches)
        mix += ["run.runner=runner_base", "run.max_epoch=2", "datasets.wds_caption.build_info.resampled=false",
                "datasets.wds_caption.build_info.lengths.train=64",
                "datasets.wds_caption.build_info.shards.train=train/shard-{000000..000001}.tar"]
    options = stream_options(synthetic_root, out, *mix, *extra)
    options[options.index(STREAM)] = str(project)
    return options


def test_mixed_stream_and_json_resume_bitwise_with_runner_iter(synthetic_root, tmp_path, monkeypatch, one_thread):
    mine = json_captions(synthetic_root, tmp_path / "mine")
    reference = cli.train(mixed_options(synthetic_root, mine, tmp_path / "a"))
    ref_dir = Path(reference.output_dir)
    _, meta = read_checkpoint(ref_dir / "checkpoint_8.safetensors")
    position = meta["ranks"][0]["position"]
    assert position["mix"]["names"] == ["wds_caption", "json_caption"] and position["mix"]["ratios"] == [3.0, 1.0]
    assert position["mix"]["draws"] == 8 and sum(position["mix"]["counts"]) == 8 and min(position["mix"]["counts"]) > 0
    assert set(position["children"]) == {"wds_caption", "json_caption"}

    interrupt_at(monkeypatch, "step", 7)
    with pytest.raises(Interrupted):
        cli.train(mixed_options(synthetic_root, mine, tmp_path / "b"))
    monkeypatch.undo()
    run_dir = the_run_dir(tmp_path / "b")
    _, meta = read_checkpoint(read_latest(run_dir))
    assert meta["ranks"][0]["position"]["mix"]["draws"] == 6
    cli.train(mixed_options(synthetic_root, mine, tmp_path / "b", "run.resume=auto"))
    assert_bitwise_equal(weights(run_dir / "checkpoint_8.safetensors"), weights(ref_dir / "checkpoint_8.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("stop_at", [5, 17])  # mid epoch 0; mid epoch 1 (its step 5)
def test_mixed_shards_and_json_resume_bitwise_with_runner_base(synthetic_root, tmp_path, monkeypatch, one_thread, stop_at):
    """Epochs of a mix: 8 + 4 = 12 steps (the children's passes summed), 2 epochs; checkpoints every 3 steps."""
    mine = json_captions(synthetic_root, tmp_path / "mine")
    reference = cli.train(mixed_options(synthetic_root, mine, tmp_path / "a", runner="runner_base"))
    ref_dir = Path(reference.output_dir)
    assert len(reference.train_loader) == 12
    interrupt_at(monkeypatch, "step", stop_at)
    with pytest.raises(Interrupted):
        cli.train(mixed_options(synthetic_root, mine, tmp_path / "b", runner="runner_base"))
    monkeypatch.undo()
    run_dir = the_run_dir(tmp_path / "b")
    cli.train(mixed_options(synthetic_root, mine, tmp_path / "b", "run.resume=auto", runner="runner_base"))
    assert_bitwise_equal(weights(run_dir / "checkpoint_1.safetensors"), weights(ref_dir / "checkpoint_1.safetensors"))


@pytest.mark.slow
def test_stream_with_two_workers_resumes_bitwise(synthetic_root, tmp_path, monkeypatch, one_thread):
    """Each DataLoader worker draws its own shards; the replayed pass is the same with workers too."""
    reference = cli.train(stream_options(synthetic_root, tmp_path / "a", workers=2))
    interrupt_at(monkeypatch, "step", 7)
    with pytest.raises(Interrupted):
        cli.train(stream_options(synthetic_root, tmp_path / "b", workers=2))
    monkeypatch.undo()
    run_dir = the_run_dir(tmp_path / "b")
    cli.train(stream_options(synthetic_root, tmp_path / "b", "run.resume=auto", workers=2))
    assert_bitwise_equal(weights(run_dir / "checkpoint_8.safetensors"),
                         weights(Path(reference.output_dir) / "checkpoint_8.safetensors"))


@pytest.mark.slow
def test_two_processes_stream_and_validate_stage1_on_uneven_shares(synthetic_root, tmp_path):
    """torchrun, 2 ranks: each rank draws its own shards; the held-out split's 3 shards go 2 + 1 to the ranks
    (16 and 8 images), so their evaluation batches differ in number: the stage-1 validation forward must not
    wait for the other rank (LAVIS's all_gather would), and the loss covers every pair once."""
    import os
    import subprocess
    import sys

    out = tmp_path / "runs"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(REPO / "train.py"),
        "--cfg-path", str(REPO / "projects/tiny/retrieval.yaml"), "--options",
        "run.task=image_text_pretrain_ext", "run.runner=runner_iter", "run.max_iters=4", "run.iters_per_inner_epoch=2",
        "run.val_freq=1", "run.batch_size_train=8", "run.batch_size_eval=7", "run.num_workers=0", "run.test_splits=[]",
        f"run.output_dir={out}", "model.vit_config.depth=1", f"datasets.wds_caption.build_info.root={synthetic_root}",
        "datasets.wds_caption.build_info.resampled=true", "datasets.wds_caption.build_info.split_by=shard",
        "datasets.wds_caption.build_info.shards={train: 'train/shard-{000000..000015}.tar', val: 'val/shard-{000000..000002}.tar'}",
        "datasets.wds_caption.build_info.lengths={val: 24}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = the_run_dir(out)
    for epoch in (0, 1):
        record = json.loads((run_dir / f"val_epoch{epoch}_metrics.json").read_text())
        assert record["num_pairs"] == 24 * 5
    assert (run_dir / "checkpoint_best.safetensors").is_file() and (run_dir / "checkpoint_4.safetensors").is_file()

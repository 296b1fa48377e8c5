"""LAVIS release checkpoints through the real loaders, offline: release-shaped artifacts (real widths and
vocabularies, reduced depth; tests/release_fixture.py) in the torch hub and Hugging Face caches, one OPT
and one Flan-T5 recipe run end to end from them, and the loader's guarantees (weights_only pickles, the
load report, the ViT depth hook). The whole recipe sweep is tests/e2e/test_release_recipes.py (slow)."""
from __future__ import annotations

import json
import pathlib

import pytest
import torch
from release_fixture import (  # noqa: F401  (release_artifacts is a fixture)
    DEPTH,
    LLM_REPOS,
    check_run,
    release_artifacts,
    run_in_subprocess,
    snapshot_dir,
)
from tiny_models import tiny_model

from lavis_ext.models.components import CheckpointPickleError, eva_depth


# ---- the artifacts are shaped like the releases ---------------------------------------------------
def test_artifacts_have_the_release_shapes(release_artifacts):
    from transformers import AutoConfig, AutoTokenizer, BertTokenizer, T5TokenizerFast

    eva = torch.load(release_artifacts.checkpoint("eva_vit_g.pth"), map_location="cpu", weights_only=True, mmap=True)
    assert eva["pos_embed"].shape == (1, 257, 1408) and eva["blocks.0.mlp.fc1.weight"].shape == (6144, 1408)
    assert max(int(k.split(".")[1]) for k in eva if k.startswith("blocks.")) == DEPTH  # one block beyond the built depth
    hf = release_artifacts.hf_home / "hub"
    for repo in ("bert-base-uncased", LLM_REPOS["opt2.7b"], LLM_REPOS["flant5xl"]):
        folder = hf / f"models--{repo.replace('/', '--')}"
        assert (folder / "snapshots" / (folder / "refs" / "main").read_text() / "config.json").is_file()
    bert = BertTokenizer.from_pretrained(snapshot_dir(release_artifacts.hf_home, "bert-base-uncased"))
    assert (len(bert), bert.pad_token_id, bert.unk_token_id, bert.cls_token_id, bert.sep_token_id, bert.mask_token_id) == (
        30522, 0, 100, 101, 102, 103)
    opt_dir = snapshot_dir(release_artifacts.hf_home, LLM_REPOS["opt2.7b"])
    opt = AutoTokenizer.from_pretrained(opt_dir, use_fast=False)
    assert (len(opt), opt.bos_token_id, opt.pad_token_id, opt.eos_token_id, opt.unk_token_id) == (50265, 2, 1, 2, 3)
    assert opt("a photo of").input_ids[0] == 2  # </s> prepended, as OPT's tokenizer does
    t5_dir = snapshot_dir(release_artifacts.hf_home, LLM_REPOS["flant5xl"])
    t5 = T5TokenizerFast.from_pretrained(t5_dir)
    assert (len(t5), t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (32100, 0, 1, 2)
    assert t5.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_99>"]) == [32099, 32000]
    opt_cfg, t5_cfg = AutoConfig.from_pretrained(opt_dir), AutoConfig.from_pretrained(t5_dir)
    assert (opt_cfg.hidden_size, opt_cfg.vocab_size, opt_cfg.num_hidden_layers) == (2560, 50272, DEPTH)
    assert (t5_cfg.d_model, t5_cfg.vocab_size, t5_cfg.num_layers, t5_cfg.num_decoder_layers) == (2048, 32128, DEPTH, DEPTH)
    assert (t5_dir / "model.safetensors.index.json").is_file()  # sharded, as the hub repo is
    release = torch.load(release_artifacts.checkpoint("blip2_pretrained_opt2.7b.pth"), map_location="cpu",
                         weights_only=True, mmap=True)
    assert set(release) == {"model"}
    keys = release["model"]
    assert keys["opt_proj.weight"].shape == (2560, 768) and keys["query_tokens"].shape == (1, 32, 768)
    assert not any(k.startswith(("visual_encoder.", "opt_model.")) for k in keys)  # frozen in stage 2: not saved


# ---- one OPT and one Flan-T5 recipe, unmodified but for depth, data and budget -----------------------
def test_opt_and_flant5_recipes_run_from_release_checkpoints(release_artifacts, tmp_path):
    """opt2.7b/eval_vqav2_zeroshot: the stage-2 release, beam-5 VQA generation; flant5xl/pretrain_stage2: the
    stage-1 release into a stage-2 model (its text side and heads are the only unused tensors), 2 optimizer
    steps, one caption. Both through lavis_ext.cli in a process that sees only the caches (HF_HUB_OFFLINE=1)."""
    runs = run_in_subprocess(release_artifacts, ["opt2.7b/eval_vqav2_zeroshot.yaml", "flant5xl/pretrain_stage2.yaml"],
                             tmp_path, timeout=900)
    for run in runs:
        check_run(run)
    vqa, stage2 = runs
    assert pathlib.Path(vqa["report"]["file"]).name == "blip2_pretrained_opt2.7b.pth"
    assert vqa["report"]["missing_by_module"] == {"opt_model": 37, "visual_encoder": 4 + 13 * DEPTH}
    assert vqa["report"]["unexpected"] == []
    assert pathlib.Path(stage2["report"]["file"]).name == "blip2_pretrained.pth"
    assert "Qformer.bert.embeddings.word_embeddings.weight" in stage2["report"]["unexpected"]
    assert {"t5_proj.weight", "t5_proj.bias"} <= set(stage2["report"]["missing"])
    assert stage2["generated"] and isinstance(stage2["generated"][0], str)


# ---- the loader itself (tiny models) -----------------------------------------------------------------
class _Payload:
    """Unpickling this runs a function: what weights_only refuses."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_a_pickle_that_needs_code_is_refused_with_the_fix(synthetic_root, tmp_path):
    model = tiny_model("blip2_opt_ext")
    marker = tmp_path / "code_ran"
    path = tmp_path / "blip2_evil.pth"
    torch.save({"model": {"opt_proj.bias": torch.zeros(1)}, "extra": _Payload(marker)}, path)
    for load in (model.load_checkpoint, model.load_from_pretrained):
        with pytest.raises(CheckpointPickleError) as info:
            load(url_or_filename=str(path))
        message = str(info.value)
        assert str(path) in message and "weights_only=True" in message and "torch.save({'model'" in message
    assert not marker.exists()


def test_a_release_url_not_in_the_cache_names_where_to_put_it(synthetic_root, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    model = tiny_model("blip2_opt_ext")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "hub" / "checkpoints" / "blip2_absent.pth")):
        model.load_checkpoint(url_or_filename="https://lavis-ext.invalid/models/blip2_absent.pth")


def test_the_load_report_counts_what_torch_does_not(synthetic_root, tmp_path):
    """A stage-1 tensor whose module LAVIS set to None (the Q-Former's word embeddings in stage 2) is
    dropped by load_state_dict(strict=False) without being reported; the report lists it as unused."""
    model = tiny_model("blip2_opt_ext")
    state = {k: v.clone() + 1 for k, v in model.state_dict().items() if not k.startswith("opt_model.")}
    state["Qformer.bert.embeddings.word_embeddings.weight"] = torch.zeros(3, model.Qformer.config.hidden_size)
    path = tmp_path / "release.pth"
    torch.save({"model": state}, path)
    report = model.load_checkpoint(url_or_filename=str(path))
    assert report["unexpected"] == ["Qformer.bert.embeddings.word_embeddings.weight"]
    assert report["missing"] == sorted(k for k in model.state_dict() if k.startswith("opt_model."))
    assert report["loaded"] == len(state) - 1 and model.checkpoint_reports[-1] is report
    assert torch.equal(model.opt_proj.weight, state["opt_proj.weight"])
    json.dumps(report)  # plain data: logs and run reports carry it


def test_a_checkpoint_of_another_shape_is_refused(synthetic_root, tmp_path):
    model = tiny_model("blip2_opt_ext")
    path = tmp_path / "other.pth"
    torch.save({"model": {"opt_proj.weight": torch.zeros(3, 3)}}, path)
    with pytest.raises(ValueError, match="opt_proj.weight"):
        model.load_checkpoint(url_or_filename=str(path))


def test_vit_depth_is_checked(synthetic_root):
    with pytest.raises(ValueError, match="eva_clip_g"):
        with eva_depth("clip_L", 2):
            pass
    with pytest.raises(ValueError, match="positive integer"):
        with eva_depth("eva_clip_g", 0):
            pass
    with pytest.raises(ValueError, match="vit_config.depth"):
        tiny_model("blip2_opt_ext", vit_depth=2)


def test_vit_depth_builds_the_real_tower_shallower_on_meta():
    """The hook changes the depth only: width, heads and MLP stay ViT-g's (a meta build reads no weights)."""
    from lavis_ext.models import meta

    cfg = {"arch": "blip2_opt_ext", "vit_model": "eva_clip_g", "vit_depth": 3, "image_size": 224, "num_query_token": 32,
           "opt_model": "facebook/opt-2.7b"}
    model = meta.build_on_meta(cfg)
    vit = model.visual_encoder
    assert len(vit.blocks) == 3 and vit.embed_dim == 1408 and vit.blocks[0].mlp.fc1.out_features == 6144
    from lavis.models import eva_vit

    assert isinstance(eva_vit.VisionTransformer, type)  # the wrapper is gone after the build

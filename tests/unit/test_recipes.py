"""The paper recipes in projects/blip2 and their launch scripts; real-size BLIP-2 builds on the meta device.

Every recipe must pass the strict config checks, build its datasets from a small fake data layout (the
environment variables the headers name), and build its model at real size on the meta device with
exactly the pinned parameter counts; docs/recipes.md must match those builds. The meta machinery itself
is checked against the published figures and against LAVIS's own sources.
"""
from __future__ import annotations

import argparse
import inspect
import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from lavis_ext.models import meta

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "projects" / "blip2"
SCRIPTS = REPO / "run_scripts" / "blip2"  # the 44 scripts launch.sh replaced
LAUNCH = REPO / "run_scripts" / "launch.sh"
DOCS = REPO / "docs" / "recipes.md"
RECIPE_FILES = [p.relative_to(RECIPES).as_posix() for p in meta.recipe_files(RECIPES)]  # not the shared _base/ files
LLMS = ("opt2.7b", "opt6.7b", "flant5xl", "flant5xxl")
PER_LLM = (
    "caption_coco_ft", "caption_coco_ft_lora", "vqav2_ft", "vqav2_ft_lora", "eval_vqav2_zeroshot",
    "eval_okvqa_zeroshot", "eval_gqa_zeroshot", "eval_nocaps_zeroshot", "eval_coco_caption", "pretrain_stage2",
)
RETRIEVAL = ("retrieval/coco_ft.yaml", "retrieval/eval_coco.yaml", "retrieval/eval_flickr30k_zeroshot.yaml")  # Table 5
QLORA = tuple(f"{llm}/{r}_lora_4bit.yaml" for llm in ("opt6.7b", "flant5xxl") for r in ("caption_coco_ft", "vqav2_ft"))  # 4-bit LLM

#: (total, trainable) parameters of each recipe's model, built on meta (see docs/recipes.md). The paper:
#: ViT-g OPT-2.7B 107M / 3.8B, OPT-6.7B 108M / 7.8B, FlanT5-XL 107M / 4.1B, FlanT5-XXL 108M / 12.1B
#: (Table 2, stage 2); 1.1B trainable for caption fine-tuning (Table 3), 1.2B for VQA fine-tuning (Table 4).
PINNED = {
    "flant5xl/caption_coco_ft.yaml": (3_942_983_040, 1_093_225_856),
    "flant5xl/caption_coco_ft_lora.yaml": (3_961_857_408, 1_112_100_224),
    "flant5xl/eval_coco_caption.yaml": (3_942_983_040, 1_093_225_856),
    "flant5xl/eval_gqa_zeroshot.yaml": (3_942_391_680, 106_739_968),
    "flant5xl/eval_nocaps_zeroshot.yaml": (3_942_983_040, 1_093_225_856),
    "flant5xl/eval_okvqa_zeroshot.yaml": (3_942_391_680, 106_739_968),
    "flant5xl/eval_vqav2_zeroshot.yaml": (3_942_391_680, 106_739_968),
    "flant5xl/pretrain_stage2.yaml": (3_942_391_680, 106_739_968),
    "flant5xl/vqav2_ft.yaml": (4_024_277_760, 1_174_520_576),
    "flant5xl/vqav2_ft_lora.yaml": (4_043_152_128, 1_193_394_944),
    "flant5xxl/caption_coco_ft.yaml": (12_230_133_120, 1_094_800_768),
    "flant5xxl/caption_coco_ft_lora.yaml": (12_267_881_856, 1_132_549_504),
    "flant5xxl/eval_coco_caption.yaml": (12_230_133_120, 108_314_880),
    "flant5xxl/eval_gqa_zeroshot.yaml": (12_229_541_760, 108_314_880),
    "flant5xxl/eval_nocaps_zeroshot.yaml": (12_230_133_120, 108_314_880),
    "flant5xxl/eval_okvqa_zeroshot.yaml": (12_229_541_760, 108_314_880),
    "flant5xxl/eval_vqav2_zeroshot.yaml": (12_229_541_760, 108_314_880),
    "flant5xxl/pretrain_stage2.yaml": (12_229_541_760, 108_314_880),
    "flant5xxl/vqav2_ft.yaml": (12_311_427_840, 1_176_095_488),
    "flant5xxl/vqav2_ft_lora.yaml": (12_349_176_576, 1_213_844_224),
    "opt2.7b/caption_coco_ft.yaml": (3_745_216_384, 1_093_619_584),
    "opt2.7b/caption_coco_ft_lora.yaml": (3_755_702_144, 1_104_105_344),
    "opt2.7b/eval_coco_caption.yaml": (3_745_216_384, 1_093_619_584),
    "opt2.7b/eval_gqa_zeroshot.yaml": (3_744_625_024, 107_133_696),
    "opt2.7b/eval_nocaps_zeroshot.yaml": (3_745_216_384, 1_093_619_584),
    "opt2.7b/eval_okvqa_zeroshot.yaml": (3_744_625_024, 107_133_696),
    "opt2.7b/eval_vqav2_zeroshot.yaml": (3_744_625_024, 107_133_696),
    "opt2.7b/pretrain_stage2.yaml": (3_744_625_024, 107_133_696),
    "opt2.7b/vqav2_ft.yaml": (3_826_511_104, 1_174_914_304),
    "opt2.7b/vqav2_ft_lora.yaml": (3_836_996_864, 1_185_400_064),
    "opt6.7b/caption_coco_ft.yaml": (7_753_274_752, 1_094_800_768),
    "opt6.7b/caption_coco_ft_lora.yaml": (7_770_051_968, 1_111_577_984),
    "opt6.7b/eval_coco_caption.yaml": (7_753_274_752, 1_094_800_768),
    "opt6.7b/eval_gqa_zeroshot.yaml": (7_752_683_392, 108_314_880),
    "opt6.7b/eval_nocaps_zeroshot.yaml": (7_753_274_752, 1_094_800_768),
    "opt6.7b/eval_okvqa_zeroshot.yaml": (7_752_683_392, 108_314_880),
    "opt6.7b/eval_vqav2_zeroshot.yaml": (7_752_683_392, 108_314_880),
    "opt6.7b/pretrain_stage2.yaml": (7_752_683_392, 108_314_880),
    "opt6.7b/vqav2_ft.yaml": (7_834_569_472, 1_176_095_488),
    "opt6.7b/vqav2_ft_lora.yaml": (7_851_346_688, 1_192_872_704),
    # the 4-bit recipes build as their LoRA siblings on meta (quantisation happens at load; see lavis_ext.memory)
    "opt6.7b/caption_coco_ft_lora_4bit.yaml": (7_770_051_968, 1_111_577_984),
    "opt6.7b/vqav2_ft_lora_4bit.yaml": (7_851_346_688, 1_192_872_704),
    "flant5xxl/caption_coco_ft_lora_4bit.yaml": (12_267_881_856, 1_132_549_504),
    "flant5xxl/vqav2_ft_lora_4bit.yaml": (12_349_176_576, 1_213_844_224),
    "pretrain_stage1.yaml": (1_172_599_998, 186_705_470),
    # stage-1 ViT-g Q-Former at image 364 with the ViT trained: the paper's 1.2B (Table 5)
    "retrieval/coco_ft.yaml": (1_173_191_358, 1_173_191_358),
    "retrieval/eval_coco.yaml": (1_173_191_358, 1_173_191_358),
    "retrieval/eval_flickr30k_zeroshot.yaml": (1_173_191_358, 1_173_191_358),
}


def project(rel: str):
    return meta.load_project(RECIPES / rel)


_COUNTS: dict[str, dict] = {}  # by model config: recipes with the same model are built once


def counts_of(rel: str) -> dict:
    model_cfg = OmegaConf.to_container(project(rel).model_cfg, resolve=False)
    for key in ("pretrained", "finetuned", "load_pretrained", "load_finetuned"):  # not read by meta builds
        model_cfg.pop(key, None)
    key = json.dumps(model_cfg, sort_keys=True)
    if key not in _COUNTS:
        model = meta.build_on_meta(project(rel).model_cfg)
        assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}
        _COUNTS[key] = meta.count_parameters(model)
    return _COUNTS[key]


# ---- layout ------------------------------------------------------------------------------------
def test_every_llm_has_every_recipe():
    expected = {f"{llm}/{r}.yaml" for llm in LLMS for r in PER_LLM} | {"pretrain_stage1.yaml", *RETRIEVAL, *QLORA}
    assert set(RECIPE_FILES) == expected
    assert set(PINNED) == expected


@pytest.mark.parametrize("rel", RECIPE_FILES)
def test_recipe_passes_the_strict_checks(rel):
    from lavis_ext.config import check_keys, check_names, load_project_yaml, project_config

    check_names(load_project_yaml(RECIPES / rel))
    check_keys(project_config(argparse.Namespace(cfg_path=str(RECIPES / rel), options=None)))


@pytest.mark.parametrize("rel", RECIPE_FILES)
def test_recipe_header_names_target_launch_and_data(rel):
    text = (RECIPES / rel).read_text()
    assert text.startswith("# "), "the header comment comes first"
    header = meta.recipe_header(RECIPES / rel)
    assert set(header) == set(meta.HEADER_FIELDS), header
    launch = header["Launch"].split()
    assert launch[:2] == ["bash", "run_scripts/launch.sh"] and (REPO / launch[2]).is_file()
    comments = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert "Override:" in comments and "Data:" in comments
    assert "/export/" not in text and "/home/" not in text  # data paths come from environment variables


def test_paper_targets_in_headers():
    expected = {
        "opt2.7b/caption_coco_ft.yaml": "BLEU-4 43.7, CIDEr 145.8",
        "opt6.7b/eval_coco_caption.yaml": "BLEU-4 43.5, CIDEr 145.2",
        "flant5xl/eval_nocaps_zeroshot.yaml": "overall CIDEr 121.6 / SPICE 15.8",
        "opt2.7b/eval_vqav2_zeroshot.yaml": "VQAv2 val 53.5",
        "flant5xxl/eval_vqav2_zeroshot.yaml": "VQAv2 val 65.2 (test-dev 65.0)",
        "flant5xxl/eval_okvqa_zeroshot.yaml": "OK-VQA 45.9",
        "flant5xxl/eval_gqa_zeroshot.yaml": "GQA 44.7",
        "opt6.7b/vqav2_ft.yaml": "test-dev 82.19 / test-std 82.30",
    }
    for rel, target in expected.items():
        assert target in meta.recipe_header(RECIPES / rel)["Expected"], rel
    # Table 3 has no FlanT5-XXL row: no invented target
    for rel in ("caption_coco_ft.yaml", "eval_coco_caption.yaml", "eval_nocaps_zeroshot.yaml"):
        assert meta.recipe_header(RECIPES / "flant5xxl" / rel)["Expected"].startswith("none"), rel
        assert "no paper row" in meta.recipe_header(RECIPES / "flant5xxl" / rel)["Reproduces"]


def test_paper_settings():
    from lavis_ext.project_files import load_project_yaml

    for llm in LLMS:
        cap = load_project_yaml(RECIPES / llm / "caption_coco_ft.yaml")
        assert (cap.run.max_epoch, cap.run.warmup_steps, cap.run.init_lr, cap.run.weight_decay) == (5, 1000, 1e-5, 0.05)
        assert cap.run.batch_size_train * 16 == 256 and cap.run.num_beams == 5
        assert (cap.model.image_size, cap.model.freeze_vit, cap.model.freeze_llm, cap.model.prompt) == (364, False, True, "a photo of")
        vqa = load_project_yaml(RECIPES / llm / "vqav2_ft.yaml")
        assert vqa.run.batch_size_train * 16 == 128 and vqa.model.image_size == 490 and vqa.model.qformer_text_input
        assert vqa.datasets.json_vqa.prompt == "Question: {} Answer:" and "prompt" not in vqa.run
        for name in ("vqav2", "okvqa", "gqa"):
            zs = load_project_yaml(RECIPES / llm / f"eval_{name}_zeroshot.yaml")
            prompt = "Question: {} Answer:" if llm.startswith("opt") else "Question: {} Short answer:"
            data = zs.datasets.gqa_files if name == "gqa" else zs.datasets.json_vqa
            assert data.prompt == prompt and "prompt" not in zs.run
            assert (zs.run.num_beams, zs.run.length_penalty, zs.run.evaluate) == (5, -1.0, True)
        for lora in ("caption_coco_ft_lora", "vqav2_ft_lora"):
            assert load_project_yaml(RECIPES / llm / f"{lora}.yaml").model.lora_llm.r == 16


# ---- the launcher --------------------------------------------------------------------------------
def test_every_header_launches_its_own_recipe_through_the_one_launcher():
    assert not SCRIPTS.exists(), "run_scripts/blip2 was replaced by run_scripts/launch.sh"
    for rel in RECIPE_FILES:
        assert meta.recipe_header(RECIPES / rel)["Launch"] == f"bash run_scripts/launch.sh projects/blip2/{rel}", rel
    assert LAUNCH.stat().st_mode & 0o111, "run_scripts/launch.sh is not executable"
    subprocess.run(["bash", "-n", str(LAUNCH)], check=True)


@pytest.mark.parametrize(("rel", "entry"), [("opt2.7b/caption_coco_ft.yaml", "train.py"), ("flant5xl/eval_gqa_zeroshot.yaml", "evaluate.py")])
def test_launcher_picks_the_entry_from_the_resolved_recipe(rel, entry, tmp_path):
    """run.evaluate sits in a _base_ file: the launcher reads the merged recipe; torchrun is faked by PYTHON."""
    import os
    import sys

    fake = tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\nif [ "$2" = torch.distributed.run ]; then shift 2; echo "$@"; else exec {sys.executable} "$@"; fi\n')
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "NPROC": "2"}
    out = subprocess.run(["bash", str(LAUNCH), f"projects/blip2/{rel}", "--options", "run.max_epoch=1"], cwd=REPO, env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    assert "--nproc_per_node=2" in out and out[out.index("--cfg-path") - 1] == entry
    assert out[out.index("--cfg-path") + 1] == str(RECIPES / rel) and out[-2:] == ["--options", "run.max_epoch=1"]
    bad = subprocess.run(["bash", str(LAUNCH), "projects/blip2/nope.yaml"], cwd=REPO, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "nope.yaml not found" in bad.stderr


# ---- datasets from a fake layout of the data the headers name -----------------------------------------
@pytest.fixture(scope="module")
def fake_data(tmp_path_factory, synthetic_root) -> dict:
    from PIL import Image

    root = tmp_path_factory.mktemp("data")

    def image(path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30), (180, 40, 40)).save(path)

    def dump(path: Path, records, jsonl=False):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records))

    coco = root / "coco"
    image(coco / "images/train2014/a.jpg")
    image(coco / "images/val2014/b.jpg")
    dump(coco / "annotations/coco_karpathy_train.json", [{"image": "train2014/a.jpg", "caption": "a red box", "image_id": "coco_1"}])
    for split in ("val", "test"):
        dump(coco / f"annotations/coco_karpathy_{split}.json", [{"image": "val2014/b.jpg", "caption": ["a red box", "red"]}])
    vqa = root / "vqa"
    image(vqa / "images/train2014/a.jpg")
    image(vqa / "images/val2014/b.jpg")
    image(vqa / "images/VG_100K/1.jpg")
    dump(vqa / "annotations/vqa_train_vg.jsonl", [
        {"image": "train2014/a.jpg", "question": "what color?", "answer": ["red"] * 10},
        {"image": "VG_100K/1.jpg", "question": "what is it?", "answer": "box"},
    ], jsonl=True)
    dump(vqa / "annotations/vqa_val.jsonl", [{"image": "val2014/b.jpg", "question": "what color?", "answers": ["red"] * 10}], jsonl=True)
    okvqa = root / "okvqa"
    image(okvqa / "images/val2014/b.jpg")
    dump(okvqa / "annotations/okvqa_val.jsonl", [{"image": "val2014/b.jpg", "question": "why?", "answers": ["fun"] * 10}], jsonl=True)
    gqa = root / "gqa"
    image(gqa / "images/n1.jpg")
    dump(gqa / "testdev_balanced_questions.json", {"201": {"imageId": "n1", "question": "is it red?", "answer": "yes"}})
    nocaps = root / "nocaps"
    image(nocaps / "images/val/x.jpg")
    dump(nocaps / "annotations/nocaps_val_4500_captions.json", {
        "images": [{"id": 0, "file_name": "x.jpg", "domain": "in-domain"}],
        "annotations": [{"image_id": 0, "id": 0, "caption": "a red box"}, {"image_id": 0, "id": 1, "caption": "red"}],
    })
    flickr = root / "flickr30k"
    image(flickr / "flickr30k-images/1.jpg")
    dump(flickr / "annotations/flickr30k_test.json", [{"image": "flickr30k-images/1.jpg", "caption": ["a red box", "red"]}])
    return {
        "FLICKR_ROOT": flickr, "COCO_ROOT": coco, "VQA_ROOT": vqa, "OKVQA_ROOT": okvqa, "GQA_ROOT": gqa, "NOCAPS_ROOT": nocaps,
        "PRETRAIN_SHARDS": synthetic_root,
    }


@pytest.mark.parametrize("rel", RECIPE_FILES)
def test_recipe_datasets_build_from_the_documented_layout(rel, fake_data, monkeypatch):
    from lavis import tasks

    for name, path in fake_data.items():
        monkeypatch.setenv(name, str(path))
    cfg = project(rel)
    header = "\n".join(line for line in (RECIPES / rel).read_text().splitlines() if line.startswith("#"))
    task = tasks.setup_task(cfg)
    datasets = task.build_datasets(cfg)
    assert len(datasets) == 1
    (name, splits), = datasets.items()
    from lavis_ext.project_files import load_project_yaml

    resolved = OmegaConf.to_yaml(load_project_yaml(RECIPES / rel))  # the variables may sit in a _base_ file
    env = [v for v in fake_data if v in resolved]
    assert env and all(v in header for v in env), "the header names the data variables the recipe reads"
    run = cfg.run_cfg
    wanted = set(run.get("train_splits", [])) | set(run.get("valid_splits", [])) | set(run.get("test_splits", []))
    assert wanted <= set(splits), (wanted, set(splits))
    size = cfg.model_cfg.image_size
    for split in wanted:
        dataset = splits[split]
        sample = next(iter(dataset)) if isinstance(dataset, torch.utils.data.IterableDataset) else dataset[0]
        assert tuple(sample["image"].shape) == (3, size, size), (split, size)
        assert isinstance(sample.get("text_input"), str) or sample.get("captions"), sorted(sample)


# ---- real-size models on meta ----------------------------------------------------------------------
@pytest.mark.parametrize("rel", RECIPE_FILES)
def test_recipe_model_builds_on_meta_with_pinned_counts(rel):
    counts = counts_of(rel)
    assert (counts["total"], counts["trainable"]) == PINNED[rel]


def test_docs_table_matches_the_builds(monkeypatch):
    monkeypatch.chdir(REPO)
    counts = {f"projects/blip2/{rel}": counts_of(rel) for rel in RECIPE_FILES}
    text = meta.markdown_table(meta.recipe_rows("projects/blip2", counts=counts))
    assert DOCS.read_text() == text, "regenerate: python -m lavis_ext.models.meta --recipes projects/blip2 --markdown docs/recipes.md"


def stage2_opt27b(**overrides):
    from lavis.common.registry import registry

    cls = registry.get_model_class("blip2_opt_ext")
    cfg = OmegaConf.merge(OmegaConf.load(cls.default_config_path("pretrain_opt2.7b")).model, {"arch": "blip2_opt_ext"}, overrides)
    return meta.build_on_meta(cfg)


def test_opt27b_stage2_matches_the_published_figures():
    model = stage2_opt27b()
    counts = meta.count_parameters(model)
    modules = counts["modules"]
    assert modules["opt_model"] == {"total": 2_651_596_800, "trainable": 0}  # OPT-2.7B
    assert modules["visual_encoder"] == {"total": 985_894_528, "trainable": 0}  # EVA ViT-g, 39 blocks, 224 px
    assert modules["Qformer"]["trainable"] == 105_137_664  # query path only (text layers dropped)
    assert counts["trainable"] == 107_133_696  # Table 2: 107M
    assert counts["total"] == 3_744_625_024  # Table 2: 3.8B
    # shapes, dtypes and ties as in a real build
    opt = model.opt_model
    assert opt.lm_head.weight is opt.model.decoder.embed_tokens.weight
    assert opt.lm_head.weight.dtype == torch.float16 and model.visual_encoder.blocks[0].mlp.fc1.weight.dtype == torch.float16
    assert model.opt_proj.weight.shape == (2560, 768) and model.query_tokens.shape == (1, 32, 768)
    assert len(model.visual_encoder.blocks) == 39
    assert not meta.meta_build_active() and nn.Linear(2, 2).weight.device.type == "cpu"  # nothing leaks out


def test_lora_r16_on_opt27b_attention_adds_the_expected_parameters():
    counts = meta.count_parameters(stage2_opt27b(lora_llm={"r": 16}))
    assert counts["modules"]["opt_model (LoRA)"] == {"total": 10_485_760, "trainable": 10_485_760}  # 32 x 4 x 2 x 16 x 2560
    assert counts["modules"]["opt_model"]["trainable"] == 0


def test_flant5_sizes():
    from lavis.common.registry import registry

    cls = registry.get_model_class("blip2_t5_ext")
    for model_type, llm_total in (("pretrain_flant5xl", 2_849_757_184), ("pretrain_flant5xxl", 11_135_332_352)):
        cfg = OmegaConf.merge(OmegaConf.load(cls.default_config_path(model_type)).model, {"arch": "blip2_t5_ext"})
        model = meta.build_on_meta(cfg)
        assert meta.count_parameters(model)["modules"]["t5_model"]["total"] == llm_total
        t5 = model.t5_model
        assert t5.encoder.embed_tokens.weight is t5.shared.weight and t5.lm_head.weight is not t5.shared.weight  # untied head
        assert t5.config.dense_act_fn == "gelu" and t5.shared.weight.dtype == torch.bfloat16  # as LAVIS's Blip2T5


def test_stage1_qformer_has_the_dec_token():
    cfg = project("pretrain_stage1.yaml").model_cfg
    model = meta.build_on_meta(cfg)
    assert len(model.tokenizer) == 30_523  # bert-base-uncased + [DEC]
    bert = model.Qformer.bert
    assert bert.embeddings.word_embeddings.weight.shape == (30_523, 768)
    assert model.Qformer.cls.predictions.decoder.weight is bert.embeddings.word_embeddings.weight


def test_building_at_the_tokenizer_size_equals_lavis_resize():
    """Stage 1 on meta builds the Q-Former at len(tokenizer) instead of resizing (which needs values)."""
    from lavis.models.blip2_models.Qformer import BertConfig, BertLMHeadModel

    def qformer(vocab):
        config = BertConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=20)
        config.encoder_width, config.add_cross_attention, config.cross_attention_freq, config.query_length = 8, True, 2, 4
        return BertLMHeadModel(config)

    resized = qformer(10)
    resized.resize_token_embeddings(11)
    shapes = lambda m: {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert shapes(resized) == shapes(qformer(11))


def test_vit_specs_are_lavis_create_functions():
    from lavis.models import clip_vit, eva_vit

    eva = inspect.getsource(eva_vit.create_eva_vit_g)
    spec = meta.VIT_SPECS["eva_clip_g"]
    for key in ("patch_size", "embed_dim", "depth", "mlp_ratio"):
        assert re.search(rf"{key}\s*=\s*{re.escape(str(spec[key]))}\b", eva), key
    assert "num_heads=1408//88" in eva.replace(" ", "") and spec["num_heads"] == 16
    clip = inspect.getsource(clip_vit.create_clip_vit_L)
    for key, value in meta.VIT_SPECS["clip_L"].items():
        assert re.search(rf"{key}\s*=\s*{value}\b", clip), key


def test_hub_facts():
    import transformers

    opt = meta.llm_config(transformers.OPTConfig, "facebook/opt-2.7b")
    assert (opt.hidden_size, opt.ffn_dim, opt.num_hidden_layers, opt.num_attention_heads, opt.vocab_size) == (2560, 10240, 32, 32, 50272)
    assert (opt.max_position_embeddings, opt.word_embed_proj_dim) == (2048, 2560)
    opt67 = meta.llm_config(transformers.OPTConfig, "facebook/opt-6.7b")
    assert (opt67.hidden_size, opt67.ffn_dim, opt67.num_hidden_layers) == (4096, 16384, 32)
    xl = meta.llm_config(transformers.T5Config, "google/flan-t5-xl")
    assert (xl.d_model, xl.d_ff, xl.d_kv, xl.num_layers, xl.num_decoder_layers, xl.num_heads, xl.vocab_size) == (2048, 5120, 64, 24, 24, 32, 32128)
    assert xl.is_gated_act and not xl.tie_word_embeddings
    xxl = meta.llm_config(transformers.T5Config, "google/flan-t5-xxl")
    assert (xxl.d_model, xxl.d_ff, xxl.num_heads) == (4096, 10240, 64)
    from lavis.models.blip2_models.Qformer import BertConfig

    bert = meta.llm_config(BertConfig, "bert-base-uncased")
    assert (bert.hidden_size, bert.num_hidden_layers, bert.num_attention_heads, bert.intermediate_size, bert.vocab_size) == (768, 12, 12, 3072, 30522)
    with pytest.raises(FileNotFoundError, match="no offline config for hub model 'facebook/opt-13b'"):
        meta.hub_entry("facebook/opt-13b")


def test_meta_tokenizer_stand_in():
    bert = meta.MetaTokenizer.from_hub("bert-base-uncased")
    assert bert.add_special_tokens({"bos_token": "[DEC]"}) == 1 and len(bert) == 30_523 and bert.bos_token_id == 30_522
    opt = meta.MetaTokenizer.from_hub("facebook/opt-2.7b")
    assert opt("a photo of", return_tensors="pt").attention_mask.sum(1).tolist() == [4]  # </s> + 3 words, as GPT-2 BPE
    assert opt("\n", add_special_tokens=False).input_ids == [opt.unk_token_id]
    t5 = meta.MetaTokenizer.from_hub("google/flan-t5-xl")
    assert len(t5) == 32_100 and t5("a b").input_ids == [2, 2, 1]
    with pytest.raises(NotImplementedError):
        opt.batch_decode([[1, 2]])


def test_cli_prints_a_report(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert meta.main(["--cfg-path", "projects/blip2/opt2.7b/eval_vqav2_zeroshot.yaml"]) == 0
    out = capsys.readouterr().out
    assert "opt_model" in out and "3,744,625,024" in out and "107,133,696" in out


@pytest.mark.parametrize("arch", ["blip2_opt_ext", "blip2_t5_ext", "blip2_qformer_ext"])
def test_meta_build_equals_a_real_build(arch, synthetic_root):
    """The tiny models (local tokenizers, inline configs) on meta and on the CPU: same parameters, same
    shapes, dtypes and trainable flags, with a LoRA strategy applied."""
    from lavis.common.registry import registry

    cls = registry.get_model_class(arch)
    cfg = OmegaConf.load(cls.default_config_path("tiny")).model
    if arch != "blip2_qformer_ext":
        cfg = OmegaConf.merge(cfg, {"lora_llm": {"r": 4}, "freeze_vit": True})
    real, on_meta = cls.from_config(cfg), meta.build_on_meta(cfg)
    describe = lambda m: {n: (tuple(p.shape), p.dtype, p.requires_grad) for n, p in m.named_parameters()}
    assert describe(on_meta) == describe(real)
    assert meta.count_parameters(on_meta) == meta.count_parameters(real)
    assert {p.device.type for p in real.parameters()} == {"cpu"}

"""Release-shaped BLIP-2 artifacts, built offline, laid out where the real loaders look.

No real weights can reach the test machines, so this module writes stand-ins with the *real widths,
vocabularies, file formats, key names and cache locations* and a reduced depth:

* ``<torch_home>/hub/checkpoints/eva_vit_g.pth``: LAVIS's EVA ``VisionTransformer`` at width 1408 (16 heads,
  MLP 6144), a bare fp16 state dict as ``create_eva_vit_g`` reads it, with ``DEPTH + 1`` blocks: the
  release holds one block more than LAVIS builds (40 vs 39), which ``strict=False`` ignores; recipes run
  with ``--options model.vit_depth=DEPTH`` (:func:`lavis_ext.models.components.eva_depth`).
* a Hugging Face hub cache (``<hf_home>/hub/models--<org>--<name>/snapshots/<hash>/`` + ``refs/main``),
  read with ``HF_HUB_OFFLINE=1``: ``bert-base-uncased`` (hidden 768, vocab 30522, ``DEPTH`` layers,
  ``BertForPreTraining`` weights), ``facebook/opt-2.7b`` / ``opt-6.7b`` (hidden 2560 / 4096, vocab 50272,
  fp16), ``google/flan-t5-xl`` / ``flan-t5-xxl`` (d_model 2048 / 4096, vocab 32128, fp32 / bf16, sharded
  with ``model.safetensors.index.json``), each config the real one (``lavis_ext/configs/hub``) with
  ``DEPTH`` layers.
* the BLIP-2 ``.pth`` releases under the names of LAVIS's URLs, in the same torch hub cache (where
  ``download_cached_file`` finds them): ``{"model": state_dict}`` pickles written the way LAVIS's
  runner writes them (every tensor except the frozen parameters; see :data:`RELEASES`), from our models
  built at these shapes.
* ``Salesforce/blip2-opt-2.7b``-style Hugging Face BLIP-2 directories (:func:`hf_blip2_dir`).

Tokenizers are the real *kind* (slow ``BertTokenizer`` vocab.txt; OPT's GPT-2 byte-level BPE vocab.json +
merges.txt without tokenizer.json; T5 ``tokenizer.json``) with the real special tokens at the real ids
and the real lengths (30522; 50265; 32000 pieces + 100 ``<extra_id_*>`` = 32100), but their pieces are
trained on about a hundred English words (:data:`CORPUS`) and padded with filler entries no text maps to:
ordinary words get other ids than in the real vocabularies, "\\n" is not OPT's id 50118, and the random
LLMs generate filler tokens.

``python tests/release_fixture.py build ROOT [--llms ...]`` builds the set; ``python tests/release_fixture.py
run RECIPE... --out-dir DIR --report OUT.json`` runs recipes (paths under projects/blip2) through
``lavis_ext.cli.train`` / ``evaluate`` with :func:`recipe_options`, in a process whose environment is
:meth:`ReleaseArtifacts.env` (the hub cache location and offline mode are read when transformers is
imported, so they are set for a fresh process, never patched), and writes what each run loaded, how many
optimizer steps it took and what it generated; :func:`check_run` holds what the tests require of it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "projects" / "blip2"
HUB_FACTS = REPO / "lavis_ext" / "configs" / "hub"
DEPTH = 2
SNAPSHOT = "5e2a1f0c0ffee0ddba11fixture00000000000000"[:40]
LLM_REPOS = {
    "opt2.7b": "facebook/opt-2.7b",
    "opt6.7b": "facebook/opt-6.7b",
    "flant5xl": "google/flan-t5-xl",
    "flant5xxl": "google/flan-t5-xxl",
}
#: LAVIS release file -> (arch, LLM key or None for stage 1, image size, ViT trained in that release).
#: A trained ViT is saved (caption fine-tuning, COCO retrieval fine-tuning); a frozen one is not
#: (LAVIS's runner drops parameters without grad; the ViT then comes from eva_vit_g.pth).
RELEASES = {
    "blip2_pretrained.pth": ("blip2_qformer_ext", None, 224, False),
    "blip2_finetune_coco.pth": ("blip2_qformer_ext", None, 364, True),
    "blip2_pretrained_opt2.7b.pth": ("blip2_opt_ext", "opt2.7b", 224, False),
    "blip2_caption_opt2.7b.pth": ("blip2_opt_ext", "opt2.7b", 364, True),
    "blip2_pretrained_opt6.7b.pth": ("blip2_opt_ext", "opt6.7b", 224, False),
    "blip2_caption_opt6.7b.pth": ("blip2_opt_ext", "opt6.7b", 364, True),
    "blip2_pretrained_flant5xl.pth": ("blip2_t5_ext", "flant5xl", 224, False),
    "blip2_caption_flant5xl.pth": ("blip2_t5_ext", "flant5xl", 364, True),
    "blip2_pretrained_flant5xxl.pth": ("blip2_t5_ext", "flant5xxl", 224, False),
}
CORPUS = [
    "a photo of a red circle above a blue square", "a small green triangle next to a large yellow box",
    "two dogs are playing in the park on a sunny day", "a man riding a bike down a city street",
    "a woman holding an umbrella in the rain", "a plate of food with rice and vegetables",
    "a cat sitting on a wooden table near a window", "a group of people standing around a kitchen",
    "Question: what color is the box? Answer: red", "Question: how many dogs are there? Answer: two",
    "Question: is it raining? Answer: yes", "Question: what is the man riding? Answer: bike",
    "a train on the tracks at the station", "an airplane flying in the blue sky over the city",
    "a bowl of fruit with apples, oranges and bananas", "the left object is left of the right one",
    "white black brown gray pink purple orange color shape size number where why who which",
]


def _json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def hub_facts(name: str) -> dict:
    return json.loads((HUB_FACTS / f"{name}.json").read_text())


def snapshot_dir(hf_home: Path, repo: str) -> Path:
    """The hub cache folder ``from_pretrained(repo)`` reads offline (``refs/main`` -> snapshot)."""
    base = Path(hf_home) / "hub" / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(SNAPSHOT)
    path = base / "snapshots" / SNAPSHOT
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---- tokenizers -------------------------------------------------------------------------------------
def _tiny_tokenizers(work: Path) -> dict:
    from lavis_ext.models.tokenizers import build_tiny_tokenizers

    return build_tiny_tokenizers(CORPUS, work / "tiny_tokenizers", bert_vocab_size=600, opt_vocab_size=900, t5_vocab_size=600)


def write_bert_tokenizer(tiny: Path, out: Path) -> None:
    """vocab.txt of 30522 entries, specials at bert-base-uncased's ids ([PAD] 0, [UNK] 100, [CLS] 101,
    [SEP] 102, [MASK] 103, [unused*] around them), the trained pieces from id 999, filler after."""
    tokens = (tiny / "vocab.txt").read_text(encoding="utf-8").splitlines()
    specials, pieces = tokens[:5], tokens[5:]
    assert specials == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], specials
    vocab = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]",
             *(f"[unused{i}]" for i in range(99, 994))]
    vocab += pieces
    vocab += [f"[unused{i}]" for i in range(994, 994 + 30522 - len(vocab))]
    assert len(vocab) == 30522 and len(set(vocab)) == len(vocab)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (out / name).write_text((tiny / name).read_text())


def write_opt_tokenizer(tiny: Path, out: Path) -> None:
    """GPT-2 byte-level BPE files with OPT's specials (<s> 0, <pad> 1, </s> 2, <unk> 3) and 50265 entries."""
    vocab = json.loads((tiny / "vocab.json").read_text(encoding="utf-8"))
    for i in range(len(vocab), 50265):
        vocab[f"<opt_filler_{i}>"] = i
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    for name in ("merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (out / name).write_bytes((tiny / name).read_bytes())


def write_t5_tokenizer(tiny: Path, out: Path) -> None:
    """tokenizer.json with T5's specials (<pad> 0, </s> 1, <unk> 2), 32000 pieces and <extra_id_99..0>
    at 32000..32099 as in the real Flan-T5 tokenizer."""
    data = json.loads((tiny / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    for i in range(len(vocab), 32000):
        vocab[f"\u2581t5filler{i}"] = i
    extra = [f"<extra_id_{i}>" for i in range(100)]
    for i, token in enumerate(reversed(extra)):
        data["added_tokens"].append({"id": 32000 + i, "content": token, "single_word": False, "lstrip": False,
                                     "rstrip": False, "normalized": False, "special": True})
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    config = json.loads((tiny / "tokenizer_config.json").read_text())
    config.update({"extra_ids": 100, "additional_special_tokens": extra})
    _json(out / "tokenizer_config.json", config)
    specials = json.loads((tiny / "special_tokens_map.json").read_text())
    _json(out / "special_tokens_map.json", {**specials, "additional_special_tokens": extra})


# ---- weights ----------------------------------------------------------------------------------------
def write_bert(hf_home: Path, tiny: Path) -> Path:
    from transformers import BertConfig, BertForPreTraining

    out = snapshot_dir(hf_home, "bert-base-uncased")
    config = BertConfig.from_dict({**hub_facts("bert-base-uncased")["config"], "num_hidden_layers": DEPTH})
    torch.manual_seed(0)
    BertForPreTraining(config).save_pretrained(out)
    write_bert_tokenizer(tiny, out)
    return out


def write_llm(hf_home: Path, llm: str, tiny: dict) -> Path:
    import transformers

    repo = LLM_REPOS[llm]
    out = snapshot_dir(hf_home, repo)
    facts = dict(hub_facts(repo)["config"])
    torch.manual_seed(1)
    if facts["model_type"] == "opt":
        config = transformers.OPTConfig.from_dict({**facts, "num_hidden_layers": DEPTH})
        model = transformers.OPTForCausalLM._from_config(config, torch_dtype=torch.float16)
        model.save_pretrained(out)
        write_opt_tokenizer(tiny["opt"], out)
    else:
        config = transformers.T5Config.from_dict({**facts, "num_layers": DEPTH, "num_decoder_layers": DEPTH})
        dtype = torch.float32 if llm == "flant5xl" else torch.bfloat16  # XXL in bf16: half the fixture's disk and memory
        model = transformers.T5ForConditionalGeneration._from_config(config, torch_dtype=dtype)
        model.save_pretrained(out, max_shard_size="400MB")  # sharded + model.safetensors.index.json, as on the hub
        write_t5_tokenizer(tiny["t5"], out)
    del model
    return out


def write_eva(torch_home: Path) -> Path:
    """eva_vit_g.pth: LAVIS's EVA ViT-g at full width, DEPTH + 1 blocks, fp16, at 224 px (16x16 patches)."""
    from functools import partial

    from lavis.models.eva_vit import VisionTransformer

    from lavis_ext.models.meta import VIT_SPECS

    torch.manual_seed(2)
    vit = VisionTransformer(img_size=224, use_mean_pooling=False, qkv_bias=True, drop_path_rate=0.0,
                            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), **{**VIT_SPECS["eva_clip_g"], "depth": DEPTH + 1})
    path = Path(torch_home) / "hub" / "checkpoints" / "eva_vit_g.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.half() for k, v in vit.state_dict().items()}, path)
    return path


def release_model_config(arch: str, llm: str | None, image_size: int, hf_home: Path) -> dict:
    """The model a release was written from: local snapshot paths (no environment needed)."""
    cfg = {"arch": arch, "vit_model": "eva_clip_g", "vit_depth": DEPTH, "image_size": image_size, "vit_precision": "fp32",
           "freeze_vit": True, "num_query_token": 32, "load_pretrained": False, "load_finetuned": False,
           "qformer_model": str(snapshot_dir(hf_home, "bert-base-uncased")),
           "qformer_tokenizer": str(snapshot_dir(hf_home, "bert-base-uncased"))}
    if llm is not None:
        key = "opt" if llm.startswith("opt") else "t5"
        cfg[f"{key}_model"] = str(snapshot_dir(hf_home, LLM_REPOS[llm]))
        cfg["llm_precision"] = "fp16" if key == "opt" else "bf16"
    return cfg


def release_state(model, vit_trained: bool, image_size: int) -> dict:
    """What LAVIS's runner saves (trainable parameters and buffers), with the ViT when it trained; the
    position embedding is resized as LAVIS resizes it (``interpolate_pos_embed``) for 364-px releases."""
    from types import SimpleNamespace

    from lavis.models.eva_vit import interpolate_pos_embed

    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}  # tied names too
    if vit_trained:
        frozen -= {n for n in frozen if n.startswith("visual_encoder.")}
    state = {k: v for k, v in model.state_dict().items() if k not in frozen}  # tied tensors stay shared, as torch.save keeps them
    if vit_trained and image_size != model.visual_encoder.patch_embed.img_size[0]:
        patches = (image_size // 14) ** 2
        vit_state = {"pos_embed": state["visual_encoder.pos_embed"]}
        interpolate_pos_embed(SimpleNamespace(patch_embed=SimpleNamespace(num_patches=patches),
                                              pos_embed=torch.empty(1, patches + 1, 1)), vit_state)
        state["visual_encoder.pos_embed"] = vit_state["pos_embed"].contiguous()
    return state


def write_releases(torch_home: Path, hf_home: Path, llm: str | None) -> list[Path]:
    """The BLIP-2 ``.pth`` releases of one LLM (``None``: stage 1), from one model built at 224 px."""
    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    import lavis_ext
    lavis_ext.register()  # registration

    files = [(name, arch, size, trained) for name, (arch, key, size, trained) in RELEASES.items() if key == llm]
    old = os.environ.get("TORCH_HOME")
    os.environ["TORCH_HOME"] = str(torch_home)  # create_eva_vit_g reads eva_vit_g.pth from there
    try:
        torch.manual_seed(3)
        arch = files[0][1]
        model = registry.get_model_class(arch).from_config(OmegaConf.create(release_model_config(arch, llm, 224, hf_home)))
        written = []
        for name, _, size, trained in files:
            path = Path(torch_home) / "hub" / "checkpoints" / name
            torch.save({"model": release_state(model, trained, size)}, path)
            written.append(path)
        return written
    finally:
        if old is None:
            os.environ.pop("TORCH_HOME", None)
        else:
            os.environ["TORCH_HOME"] = old


def release_model(artifacts, llm: str = "opt2.7b"):
    """Our stage-2 model as the ``blip2_pretrained_<llm>.pth`` release describes it: built from the
    fixture's snapshots (224 px, ViT from eva_vit_g.pth), then that release loaded; fp32."""
    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    arch = "blip2_opt_ext" if llm.startswith("opt") else "blip2_t5_ext"
    old = os.environ.get("TORCH_HOME")
    os.environ["TORCH_HOME"] = str(artifacts.torch_home)
    try:
        model = registry.get_model_class(arch).from_config(OmegaConf.create(release_model_config(arch, llm, 224, artifacts.hf_home)))
        model.load_checkpoint(str(artifacts.checkpoint(f"blip2_pretrained_{llm}.pth")))
    finally:
        if old is None:
            os.environ.pop("TORCH_HOME", None)
        else:
            os.environ["TORCH_HOME"] = old
    return model.float().eval()


def hf_blip2_dir(model, out: Path, max_shard_size: str = "300MB") -> Path:
    """A ``Salesforce/blip2-opt-2.7b``-shaped directory of ``model``: config.json with vision_config /
    qformer_config / text_config, sharded safetensors with model.safetensors.index.json,
    preprocessor_config.json and the LLM's tokenizer files, written by Hugging Face's own classes
    (``Blip2ForConditionalGeneration`` / ``Blip2Processor.save_pretrained``) from the bridge's conversion."""
    from lavis_ext.interop import hf_bridge

    hf_model, processor, _ = hf_bridge.to_hf(model)
    hf_model.save_pretrained(out, max_shard_size=max_shard_size)
    processor.save_pretrained(out)
    del hf_model
    return Path(out)


# ---- data -------------------------------------------------------------------------------------------
def write_data(root: Path) -> dict:
    """The layouts the recipe headers name, with two optimizer steps of training data (see
    :func:`recipe_options`) and one or two evaluation records; images 224 px (the processors resize
    to each recipe's size)."""
    from PIL import Image

    from lavis_ext.datasets.to_shards import write_shards

    def image(path: Path, color):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (224, 224), color).save(path)

    def dump(path: Path, records, jsonl=False):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records))

    coco = root / "coco"
    image(coco / "images/train2014/a.jpg", (200, 30, 30))
    image(coco / "images/train2014/c.jpg", (30, 30, 200))
    image(coco / "images/val2014/b.jpg", (30, 200, 30))
    dump(coco / "annotations/coco_karpathy_train.json", [
        {"image": "train2014/a.jpg", "caption": "a red box", "image_id": "coco_1"},
        {"image": "train2014/c.jpg", "caption": "a blue box", "image_id": "coco_2"},
        {"image": "train2014/a.jpg", "caption": "a box that is red", "image_id": "coco_1"},
        {"image": "train2014/c.jpg", "caption": "a box that is blue", "image_id": "coco_2"}])
    for split in ("val", "test"):
        dump(coco / f"annotations/coco_karpathy_{split}.json", [{"image": "val2014/b.jpg", "caption": ["a green box", "green"]}])
    vqa = root / "vqa"
    image(vqa / "images/train2014/a.jpg", (200, 30, 30))
    image(vqa / "images/val2014/b.jpg", (30, 200, 30))
    image(vqa / "images/VG_100K/1.jpg", (30, 30, 200))
    dump(vqa / "annotations/vqa_train_vg.jsonl", [
        {"image": "train2014/a.jpg", "question": "what color is it?", "answer": ["red"] * 10},
        {"image": "VG_100K/1.jpg", "question": "what is it?", "answer": "box"}], jsonl=True)
    dump(vqa / "annotations/vqa_val.jsonl", [{"image": "val2014/b.jpg", "question": "what color?", "answers": ["green"] * 10}], jsonl=True)
    okvqa = root / "okvqa"
    image(okvqa / "images/val2014/b.jpg", (30, 200, 30))
    dump(okvqa / "annotations/okvqa_val.jsonl", [{"image": "val2014/b.jpg", "question": "why?", "answers": ["fun"] * 10}], jsonl=True)
    gqa = root / "gqa"
    image(gqa / "images/n1.jpg", (200, 30, 30))
    dump(gqa / "testdev_balanced_questions.json", {"201": {"imageId": "n1", "question": "is it red?", "answer": "yes"}})
    nocaps = root / "nocaps"
    image(nocaps / "images/val/x.jpg", (200, 200, 30))
    dump(nocaps / "annotations/nocaps_val_4500_captions.json", {
        "images": [{"id": 0, "file_name": "x.jpg", "domain": "in-domain"}],
        "annotations": [{"image_id": 0, "id": 0, "caption": "a yellow box"}, {"image_id": 0, "id": 1, "caption": "yellow"}]})
    flickr = root / "flickr30k"
    image(flickr / "flickr30k-images/1.jpg", (200, 30, 30))
    image(flickr / "flickr30k-images/2.jpg", (30, 30, 200))
    dump(flickr / "annotations/flickr30k_test.json", [
        {"image": "flickr30k-images/1.jpg", "caption": ["a red box", "red"]},
        {"image": "flickr30k-images/2.jpg", "caption": ["a blue box", "blue"]}])
    shards = root / "shards"  # the four COCO training captions as webdataset shards (pretraining recipes)
    write_shards("caption", coco / "annotations/coco_karpathy_train.json", coco / "images", shards, "train")
    return {"COCO_ROOT": coco, "VQA_ROOT": vqa, "OKVQA_ROOT": okvqa, "GQA_ROOT": gqa, "NOCAPS_ROOT": nocaps,
            "FLICKR_ROOT": flickr, "PRETRAIN_SHARDS": shards}


# ---- the whole set ----------------------------------------------------------------------------------
class ReleaseArtifacts:
    """Everything under one root; :meth:`ensure` builds what is missing (each part once, marked done)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.torch_home = self.root / "torch"
        self.hf_home = self.root / "hf"
        self.data_root = self.root / "data"
        self.timings: dict[str, float] = {}

    def _once(self, name: str, build) -> None:
        marker = self.root / ".done" / name
        if marker.exists():
            return
        start = time.perf_counter()
        build()
        self.timings[name] = time.perf_counter() - start
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("")

    def ensure(self, llms=("opt2.7b", "flant5xl")) -> ReleaseArtifacts:
        work = self.root / "work"
        tiny = {}

        def tokenizers():
            tiny.update(_tiny_tokenizers(work))

        self._once("tokenizers", tokenizers)
        tiny = tiny or {k: work / "tiny_tokenizers" / k for k in ("bert", "opt", "t5")}
        self._once("bert", lambda: write_bert(self.hf_home, tiny["bert"]))
        self._once("eva", lambda: write_eva(self.torch_home))
        self._once("data", lambda: write_data(self.data_root))
        for llm in llms:
            self._once(f"llm-{llm}", lambda llm=llm: write_llm(self.hf_home, llm, tiny))
        self._once("release-stage1", lambda: write_releases(self.torch_home, self.hf_home, None))
        for llm in llms:
            self._once(f"release-{llm}", lambda llm=llm: write_releases(self.torch_home, self.hf_home, llm))
        return self

    @property
    def data_env(self) -> dict:
        names = ("COCO_ROOT", "VQA_ROOT", "OKVQA_ROOT", "GQA_ROOT", "NOCAPS_ROOT", "FLICKR_ROOT")
        paths = dict(zip(names, ("coco", "vqa", "okvqa", "gqa", "nocaps", "flickr30k")))
        env = {k: str(self.data_root / v) for k, v in paths.items()}
        env["PRETRAIN_SHARDS"] = str(self.data_root / "shards")
        return env

    def env(self) -> dict:
        """A process environment in which the real loaders find these files and nothing else."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_HOME", "TORCH_HOME", "BLIP2_STAGE1")}
        env.update(self.data_env)
        env.update({"TORCH_HOME": str(self.torch_home), "HF_HOME": str(self.hf_home), "HF_HUB_OFFLINE": "1",
                    "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
        return env

    def checkpoint(self, name: str) -> Path:
        return self.torch_home / "hub" / "checkpoints" / name


# ---- what a release load must report ----------------------------------------------------------------
#: Stage-1 tensors a stage-2 model has no place for (LAVIS drops the Q-Former's text side and the
#: stage-1 heads when it builds BLIP-2 OPT / Flan-T5), by name pattern.
STAGE1_ONLY = re.compile(
    r"^(Qformer\.cls\.|Qformer\.bert\.embeddings\.(word|position)_embeddings\.|Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.|"
    r"vision_proj\.|text_proj\.|itm_head\.|temp$)"
)
#: The Q-Former's text side, which a model with ``qformer_text_input`` keeps (initialised from
#: bert-base-uncased) but stage-2 releases do not hold.
QFORMER_TEXT_SIDE = re.compile(r"^Qformer\.bert\.(embeddings\.(word|position)_embeddings\.|encoder\.layer\.\d+\.(intermediate|output)\.)")


def expected_load(report: dict, model_keys) -> tuple[set, set]:
    """(missing, unexpected) keys a release load must report, from what each release holds by design:

    * the LLM (``opt_model.`` / ``t5_model.``, LoRA adapters included) is never in a release: it comes
      from the hub snapshot;
    * the ViT is missing where the release trained with it frozen (it comes from eva_vit_g.pth);
    * a stage-2 model started from the stage-1 release: its LLM projection is new, and the stage-1
      text side and heads (:data:`STAGE1_ONLY`) are the only unused tensors;
    * a Q-Former that reads the question keeps a text side stage-2 releases do not hold.
    Everything else must load: no other key may be missing or unused.
    """
    name = Path(report["file"]).name
    arch, llm, _, vit_trained = RELEASES[name]
    # releases load before LoRA wraps the LLM (lavis_ext.models.strategies.finish_from_config): the model's
    # names at that moment are the plain ones
    model_keys = {k.replace(".base_layer.", ".") for k in model_keys if ".lora_" not in k}
    stage1_into_stage2 = llm is None and any(k.startswith(("opt_proj.", "t5_proj.")) for k in model_keys)
    missing = set()
    for key in model_keys:
        if key.startswith(("opt_model.", "t5_model.")):
            missing.add(key)
        elif key.startswith("visual_encoder.") and not vit_trained:
            missing.add(key)
        elif stage1_into_stage2 and key.startswith(("opt_proj.", "t5_proj.")):
            missing.add(key)
        elif llm is not None and QFORMER_TEXT_SIDE.match(key):
            missing.add(key)
    held = torch.load(report["file"], map_location="cpu", weights_only=True, mmap=True)["model"]
    unexpected = {k for k in held if STAGE1_ONLY.match(k)} if stage1_into_stage2 else set()
    return missing, unexpected


#: Recipe -> ``--options`` beyond :func:`recipe_options`, each with its reason (nothing else is changed).
EXCEPTIONS = {
    # LAVIS's OK-VQA protocol lemmatizes Flan-T5's answers with spaCy's en_core_web_sm, a model package that is
    # not on PyPI (only third-party mirrors) and so cannot be installed offline here.
    "flant5xl/eval_okvqa_zeroshot.yaml": ["model.apply_lemmatizer=false"],
    "flant5xxl/eval_okvqa_zeroshot.yaml": ["model.apply_lemmatizer=false"],
}


def check_run(run: dict) -> None:
    """The assertions every release-shaped recipe run must pass (see :func:`run_recipe`)."""
    from lavis_ext.project_files import load_project_yaml

    rel = run["recipe"]
    model_cfg = load_project_yaml(RECIPES / rel).model
    report = run["report"]
    if model_cfg.get("load_pretrained", True) is False and not model_cfg.get("load_finetuned", False):
        assert report is None, f"{rel}: loads nothing by design, yet read {report and report['file']}"
    else:
        assert report is not None, f"{rel}: no checkpoint was loaded"
        finetuned = model_cfg.get("load_finetuned", None)
        for each in run["reports"]:  # `pretrained`, then `finetuned` where the model type loads one
            assert each["source"].startswith("https://") and Path(each["file"]).name in RELEASES, each["source"]
            missing, unexpected = expected_load(each, run["model_keys"])
            assert set(each["missing"]) == missing, (rel, each["file"], sorted(set(each["missing"]) ^ missing)[:10])
            assert set(each["unexpected"]) == unexpected, (rel, each["file"], sorted(set(each["unexpected"]) ^ unexpected)[:10])
            assert each["loaded"] == each["tensors"] - len(unexpected) > 0
        if finetuned is False:
            assert len(run["reports"]) == 1, [r["file"] for r in run["reports"]]
    recipe_run = load_project_yaml(RECIPES / rel).run
    if recipe_run.get("amp", False) and recipe_run.get("amp_dtype", "bf16") == "bf16":
        assert run["autocast"] == "torch.bfloat16", (rel, run["autocast"])  # bf16 recipes autocast on CPU too
    if run["evaluate"]:
        assert run["optimizer_steps"] == 0
    else:
        assert run["optimizer_steps"] == 2 and run["nonfinite_steps"] == 0, (rel, run["optimizer_steps"], run["nonfinite_steps"])
    stage1 = rel.startswith(("pretrain_stage1", "retrieval/"))
    if stage1:  # Q-Former retrieval / pretraining: nothing to generate
        assert run["generated"] is None
    else:
        texts = [r.get("caption", r.get("answer")) for rows in run["results"].values() if isinstance(rows, list) for r in rows]
        texts += run["generated"] or []
        assert texts and all(isinstance(t, str) for t in texts), (rel, run["results"], run["generated"])
    vit = run["vit"]
    assert (vit["blocks"], vit["width"]) == (DEPTH, 1408)
    assert vit["max_abs_diff"] < 1e-4, vit  # from eva_vit_g.pth or the release (frozen, or 2 warm-up steps)
    if not stage1:
        llm = run["llm"]
        assert llm["max_abs_diff"] is not None and llm["max_abs_diff"] <= llm["scale"] * 2 ** -7, llm  # bf16 rounding at most


@pytest.fixture(scope="session")
def release_artifacts(tmp_path_factory) -> ReleaseArtifacts:
    """OPT-2.7B, Flan-T5-XL and stage-1 artifacts, built once per session (one folder for all modules)."""
    return ReleaseArtifacts(tmp_path_factory.getbasetemp() / "release").ensure(("opt2.7b", "flant5xl"))


def run_in_subprocess(artifacts: ReleaseArtifacts, recipes, out_dir: Path, timeout: int, env=None) -> list[dict]:
    """:func:`run_recipe` for each recipe in one fresh process with ``artifacts.env()`` (plus ``env``)."""
    import subprocess

    report = Path(out_dir) / "runs.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "run", *recipes, "--out-dir", str(out_dir), "--report", str(report)]
    proc = subprocess.run(cmd, env={**artifacts.env(), **(env or {})}, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(report.read_text())


# ---- running recipes (in a process whose environment is ReleaseArtifacts.env()) ------------------------
def recipe_options(rel: str, out_dir: str | os.PathLike) -> list[str]:
    """``--options`` for a release-shaped run: the depth, the output folder, CPU and a tiny data budget
    (two optimizer steps: two records at batch 1, or ten wds captions at batch 5); nothing else."""
    from lavis_ext.project_files import load_project_yaml

    raw = load_project_yaml(RECIPES / rel)
    # four captions (COCO files or shards) at batch 2 (stage 1's contrastive loss needs two samples a batch);
    # two VQA records at batch 1
    batch = 2 if {"json_caption", "wds_caption"} & set(raw.datasets) else 1
    return [
        f"model.vit_depth={DEPTH}",
        f"run.output_dir={Path(out_dir) / rel.replace('/', '__').removesuffix('.yaml')}",
        "run.device=cpu", "run.num_workers=0", "run.max_epoch=1",
        f"run.batch_size_train={batch}", "run.batch_size_eval=2",
    ]


def _llm_tensor_check(model, hf_home: Path) -> dict | None:
    """Max |model - hub snapshot| of one deep LLM weight (proves the LLM came from the cache)."""
    from safetensors import safe_open

    from lavis_ext.models.strategies import llm_of

    kind, llm = llm_of(model)
    if llm is None:
        return None
    name = f"model.decoder.layers.{DEPTH - 1}.fc1.weight" if kind == "opt" else f"encoder.block.{DEPTH - 1}.layer.1.DenseReluDense.wi_0.weight"
    snapshot = Path(llm.config._name_or_path)  # a hub name: its snapshot in the cache
    snapshot = snapshot if snapshot.is_dir() else snapshot_dir(hf_home, str(snapshot))
    for file in sorted(snapshot.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            if name in f.keys():
                stored = f.get_tensor(name).float()
                ours = dict(llm.named_parameters())[name].detach().float()
                return {"tensor": name, "snapshot": str(snapshot), "max_abs_diff": float((ours - stored).abs().max()),
                        "scale": float(stored.abs().max())}
    return {"tensor": name, "snapshot": str(snapshot), "max_abs_diff": None}


def _vit_tensor_check(model, torch_home: Path, report: dict | None) -> dict:
    """Max |model - source| of the deepest ViT block: the release file where it holds the ViT, else eva_vit_g.pth."""
    name = f"blocks.{DEPTH - 1}.mlp.fc2.weight"
    state = torch.load(report["file"], map_location="cpu", weights_only=True, mmap=True)["model"] if report else {}
    if f"visual_encoder.{name}" in state:
        source, stored = report["file"], state[f"visual_encoder.{name}"]
    else:
        source = str(Path(torch_home) / "hub" / "checkpoints" / "eva_vit_g.pth")
        stored = torch.load(source, map_location="cpu", weights_only=True, mmap=True)[name]
    ours = dict(model.visual_encoder.named_parameters())[name].detach().float()
    return {"tensor": name, "source": source, "max_abs_diff": float((ours - stored.float()).abs().max()),
            "blocks": len(model.visual_encoder.blocks), "width": model.visual_encoder.embed_dim}


def _generate_once(model, image_size: int, data_env: dict) -> list[str]:
    """One caption from a data image, for recipes whose runs generate nothing themselves (pretraining)."""
    from lavis.processors.blip_processors import BlipImageEvalProcessor
    from PIL import Image

    image = Image.open(Path(data_env["COCO_ROOT"]) / "images/val2014/b.jpg").convert("RGB")
    pixel = BlipImageEvalProcessor(image_size=image_size)(image).unsqueeze(0)
    model.eval()
    with torch.no_grad():
        return model.generate({"image": pixel}, num_beams=1, max_length=8, min_length=1)


def run_recipe(rel: str, out_dir: Path) -> dict:
    """One recipe through ``lavis_ext.cli.train`` (``evaluate`` for ``run.evaluate: true`` recipes, as
    run_scripts/launch.sh calls evaluate.py), then what it loaded, trained and generated."""
    import resource

    from lavis_ext.project_files import load_project_yaml

    from lavis_ext import cli

    raw = load_project_yaml(RECIPES / rel)
    argv = ["--cfg-path", str(RECIPES / rel), "--options", *recipe_options(rel, out_dir), *EXCEPTIONS.get(rel, [])]
    start = time.perf_counter()
    evaluate = bool(raw.run.get("evaluate", False))
    runner = cli.evaluate(argv)[0] if evaluate else cli.train(argv)
    wall = time.perf_counter() - start
    model = getattr(runner._model, "module", runner._model)
    reports = getattr(model, "checkpoint_reports", [])
    report = reports[-1] if reports else None
    optimizer = getattr(runner, "_optimizer", None)
    steps = 0
    if optimizer is not None:
        steps = max((int(s["step"]) for s in optimizer.state.values() if "step" in s), default=0)
    results = {}
    for path in sorted(Path(runner.result_dir).glob("*.json")):
        data = json.loads(path.read_text())
        results[path.name] = data[:2] if isinstance(data, list) else data
    generated = None
    if not results and hasattr(model, "generate") and not rel.startswith(("pretrain_stage1", "retrieval/")):
        generated = _generate_once(model, int(runner.config.model_cfg.image_size), dict(os.environ))
    hf_home = Path(os.environ["HF_HOME"])
    from lavis_ext.precision import resolve_amp_dtype

    out = {
        "autocast": str(resolve_amp_dtype(runner.config.run_cfg, runner.device, model)),  # what the loop ran under
        "recipe": rel, "evaluate": evaluate, "wall_s": round(wall, 1), "run_dir": str(runner.output_dir),
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "report": report, "reports": reports, "model_keys": sorted(model.state_dict()),
        "optimizer_steps": steps, "nonfinite_steps": runner.loop.state.nonfinite_steps,
        "results": results, "generated": generated,
        "vit": _vit_tensor_check(model, Path(os.environ["TORCH_HOME"]), report),
        "llm": _llm_tensor_check(model, hf_home),
    }
    del runner, model
    import gc

    gc.collect()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Release-shaped BLIP-2 artifacts and recipe runs (tests).")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build the artifacts under ROOT")
    build.add_argument("root")
    build.add_argument("--llms", nargs="+", default=["opt2.7b", "flant5xl"], choices=sorted(LLM_REPOS))
    run = sub.add_parser("run", help="run recipes (relative to projects/blip2) in this process; environment from ReleaseArtifacts.env()")
    run.add_argument("recipes", nargs="+")
    run.add_argument("--out-dir", required=True)
    run.add_argument("--report", required=True)
    args = parser.parse_args(argv)
    if args.command == "build":
        import lavis_ext
        lavis_ext.register()

        print(json.dumps(ReleaseArtifacts(args.root).ensure(args.llms).timings))
        return 0
    reports = []
    for rel in args.recipes:
        reports.append(run_recipe(rel, Path(args.out_dir)))
        Path(args.report).write_text(json.dumps(reports, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())

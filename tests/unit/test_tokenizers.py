"""Tiny offline tokenizers load through the exact calls LAVIS/BLIP-2 makes.

Why: BLIP-2 hard-codes Hub tokenizers we cannot download, so the stand-ins
must honour the same loaders and special-token conventions (ids, bos/eos,
"\\n" as OPT's end-of-caption token) or the models silently train on garbage.
"""

from __future__ import annotations

import filecmp
import json
import random

import pytest
from transformers import AutoTokenizer, BertTokenizer, GPT2Tokenizer, GPT2TokenizerFast, T5TokenizerFast

from lavis_ext.models.tokenizers import build_tiny_tokenizers, tokenizer_vocab_sizes

COLORS = ["red", "green", "blue", "yellow", "purple", "gray"]
SHAPES = ["circle", "square", "triangle", "star"]

TEXTS = (
    [f"a photo of a {size} {c} {s}" for c in COLORS for s in SHAPES for size in ("small", "large")]
    + [f"what color is the {s}?" for s in SHAPES]
    + [f"is there a {c} {s} to the left of the {s2}?" for c in COLORS[:3] for s in SHAPES for s2 in SHAPES[:2]]
    + ["how many shapes are there?", "there are 3 shapes: a red circle, a blue square and a star."]
    + ["question: what color is the circle? short answer:", "yes", "no", "two", "3"]
    + COLORS
    + SHAPES
)

PROBES = [
    "a photo of a red circle",
    "what color is the triangle?",
    "question: what color is the circle? short answer:",
    "there are 3 shapes: a red circle, a blue square and a star.",
    "red",
]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return build_tiny_tokenizers(TEXTS, tmp_path_factory.mktemp("tok"))


def test_layout_has_only_local_tokenizer_files(paths):
    """Each dir holds just what its loader reads; OPT has no tokenizer.json, like facebook/opt-*."""
    assert set(paths) == {"bert", "opt", "t5"}
    files = {k: sorted(p.name for p in v.iterdir()) for k, v in paths.items()}
    assert files == {
        "bert": ["special_tokens_map.json", "tokenizer_config.json", "vocab.txt"],
        "opt": ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"],
        "t5": ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"],
    }


def test_bert_loads_like_lavis_and_accepts_dec(paths):
    """Blip2Base.init_tokenizer: slow BertTokenizer, then [DEC] added as bos (one new id)."""
    tok = BertTokenizer.from_pretrained(str(paths["bert"]))
    assert tok.convert_tokens_to_ids(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]) == [0, 1, 2, 3, 4]
    assert tok.pad_token_id == 0 and tok.do_lower_case
    n = len(tok)
    assert tok.add_special_tokens({"bos_token": "[DEC]"}) == 1
    assert len(tok) == n + 1 and tok.bos_token_id == n

    ids = tok("A Photo of a RED circle").input_ids
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert tok.unk_token_id not in ids
    assert tok.convert_ids_to_tokens(ids[1:-1]) == ["a", "photo", "of", "a", "red", "circle"]
    for text in PROBES:
        if ":" not in text:  # BERT's decode cleanup rejoins "?" "," "." but not ":"
            assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text
    # unseen words fall back to characters, not [UNK]
    assert tok.unk_token_id not in tok("zebra").input_ids


def test_opt_slow_follows_opt_conventions(paths):
    """Blip2OPT: AutoTokenizer(use_fast=False) -> GPT2Tokenizer with OPT ids and bos '</s>' prepended."""
    tok = AutoTokenizer.from_pretrained(str(paths["opt"]), use_fast=False)
    assert type(tok) is GPT2Tokenizer
    assert tok.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>"]) == [0, 1, 2, 3]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("</s>", "</s>", "<pad>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (2, 2, 1)

    newline = tok("\n", add_special_tokens=False).input_ids
    assert len(newline) == 1  # Blip2OPT's end-of-caption id

    ids = tok("a photo of a red circle\n").input_ids
    assert ids[0] == 2 and ids[-1] == newline[0]
    assert tok("a photo of a red circle\n", add_special_tokens=False).input_ids == ids[1:]
    for text in PROBES:
        enc = tok(text + "\n").input_ids
        assert tok.unk_token_id not in enc
        assert tok.decode(enc, skip_special_tokens=True) == text + "\n"

    tok.padding_side = "right"
    batch = tok(["red\n", "a photo of a red circle\n"], padding="longest")
    assert batch.input_ids[0][-1] == 1 and batch.attention_mask[0][-1] == 0


def test_opt_fast_agrees_with_slow(paths):
    """AutoTokenizer (fast, converted from slow files on load) gives identical ids incl. bos."""
    slow = AutoTokenizer.from_pretrained(str(paths["opt"]), use_fast=False)
    fast = AutoTokenizer.from_pretrained(str(paths["opt"]))
    assert isinstance(fast, GPT2TokenizerFast)
    assert len(fast) == len(slow)
    for text in TEXTS + PROBES + ["\n", "An Unseen Sentence, with CAPS!\n"]:
        for special in (True, False):
            assert fast(text, add_special_tokens=special).input_ids == slow(text, add_special_tokens=special).input_ids


def test_t5_follows_t5_conventions(paths):
    """Blip2T5: T5TokenizerFast from tokenizer.json alone; <pad>=0, </s>=1 appended, no sentinels."""
    tok = T5TokenizerFast.from_pretrained(str(paths["t5"]))
    assert tok.convert_tokens_to_ids(["<pad>", "</s>", "<unk>"]) == [0, 1, 2]
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.additional_special_tokens == []
    assert len(tok) == tok.vocab_size
    for text in PROBES:
        ids = tok(text).input_ids
        assert ids[-1] == 1 and ids.count(1) == 1
        assert tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(tok("a  photo").input_ids, skip_special_tokens=True) == "a photo"  # spaces normalise
    batch = tok(["red", "what color is the circle?"], padding="longest")
    assert batch.input_ids[0][-1] == 0


def test_vocab_sizes_cover_every_id(paths):
    """Embedding/LM-head sizes: len(tokenizer), with BERT counting LAVIS's [DEC]."""
    sizes = tokenizer_vocab_sizes(paths)
    bert_lines = (paths["bert"] / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert sizes["bert"] == len(bert_lines) + 1
    assert sizes["opt"] == len(json.loads((paths["opt"] / "vocab.json").read_text(encoding="utf-8")))
    t5 = T5TokenizerFast.from_pretrained(str(paths["t5"]))
    assert sizes["t5"] == len(t5)
    opt = AutoTokenizer.from_pretrained(str(paths["opt"]), use_fast=False)
    for text in TEXTS:
        assert max(opt(text + "\n").input_ids) < sizes["opt"]
        assert max(t5(text).input_ids) < sizes["t5"]


def test_vocab_size_caps_are_respected(tmp_path):
    """The vocab_size arguments are upper bounds on the trained vocabularies."""
    paths = build_tiny_tokenizers(TEXTS, tmp_path, bert_vocab_size=150, opt_vocab_size=280, t5_vocab_size=90)
    sizes = tokenizer_vocab_sizes(paths)
    assert sizes["bert"] == 150 + 1
    assert sizes["opt"] <= 280 and sizes["t5"] <= 90


def test_build_is_deterministic(tmp_path):
    """Same texts in any order -> byte-identical files (tokenizers' trainers are order/hash sensitive)."""
    shuffled = list(TEXTS)
    random.Random(0).shuffle(shuffled)
    a = build_tiny_tokenizers(TEXTS, tmp_path / "a")
    b = build_tiny_tokenizers(reversed(shuffled), tmp_path / "b")
    for key in a:
        names = sorted(p.name for p in a[key].iterdir())
        assert names == sorted(p.name for p in b[key].iterdir())
        match, mismatch, errors = filecmp.cmpfiles(a[key], b[key], names, shallow=False)
        assert (mismatch, errors) == ([], []), key


def test_opt_loader_gives_the_fast_tokenizer_with_the_slow_ids(paths):
    """What Blip2OPTExt trains with: the Rust tokenizer (LAVIS's slow one costs ~3 ms a step), same ids and padding."""
    from lavis_ext.models.tokenizers import OPT_PROBES, load_opt_tokenizer

    fast, slow = load_opt_tokenizer(str(paths["opt"])), load_opt_tokenizer(str(paths["opt"]), fast=False)
    assert isinstance(fast, GPT2TokenizerFast) and type(slow) is GPT2Tokenizer
    captions = [t + "\n" for t in TEXTS] + list(OPT_PROBES)
    for side in ("right", "left"):
        a = fast(captions, padding="longest", truncation=True, max_length=12, padding_side=side)
        b = slow(captions, padding="longest", truncation=True, max_length=12, padding_side=side)
        assert a.input_ids == b.input_ids and a.attention_mask == b.attention_mask
    ids = fast("a photo of a red circle\n").input_ids
    assert fast.decode(ids, skip_special_tokens=True) == slow.decode(ids, skip_special_tokens=True) == "a photo of a red circle\n"


def test_opt_loader_falls_back_to_slow_when_the_fast_ids_differ(paths, monkeypatch, caplog):
    from lavis_ext.models import tokenizers

    real = AutoTokenizer.from_pretrained
    t5 = T5TokenizerFast.from_pretrained(str(paths["t5"]))  # other ids for the same text
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda src, use_fast=True, **kw: t5 if use_fast else real(src, use_fast=False, **kw))
    assert type(tokenizers.load_opt_tokenizer(str(paths["opt"]))) is GPT2Tokenizer
    assert "gives other ids than the slow one" in caplog.text


def test_blip2_opt_is_built_with_the_fast_tokenizer(synthetic_root):
    from tiny_models import tiny_model

    assert isinstance(tiny_model("blip2_opt_ext").opt_tokenizer, GPT2TokenizerFast)

"""Tiny, offline-trained stand-ins for the three tokenizers BLIP-2 loads.

LAVIS 1.0.2 hard-codes Hub tokenizers (``bert-base-uncased``, ``facebook/opt-*``,
``google/flan-t5-*``) that cannot be downloaded here.  This module trains
small tokenizers with the Hugging Face ``tokenizers`` library on the synthetic
dataset's own text and writes directories that the *exact* loading calls used
by LAVIS accept, keeping the special-token conventions of the real models:

* ``bert`` -- ``BertTokenizer.from_pretrained(dir)`` (slow, ``vocab.txt``):
  lowercase WordPiece, ``[PAD]``=0, ``[UNK]``=1, ``[CLS]``=2, ``[SEP]``=3,
  ``[MASK]``=4.  LAVIS then adds ``[DEC]`` as ``bos_token`` (one new id).
* ``opt`` -- ``AutoTokenizer.from_pretrained(dir, use_fast=False)`` gives a
  ``GPT2Tokenizer`` (byte-level BPE) with ``<s>``=0, ``<pad>``=1, ``</s>``=2,
  ``<unk>``=3, ``bos_token = eos_token = "</s>"`` and ``add_bos_token=True``
  (so ``</s>`` is prepended, as for OPT).  No ``tokenizer.json`` is written,
  exactly like the real OPT repos: the fast tokenizer is converted from the
  slow files on load, which is how the ``add_bos_token`` template reaches it.
* ``t5`` -- ``T5TokenizerFast.from_pretrained(dir)`` (``tokenizer.json``
  only, no SentencePiece model): BPE + Metaspace (``▁``), ``<pad>``=0, ``</s>``=1,
  ``<unk>``=2, ``</s>`` appended, ``extra_ids=0`` so ``len(tokenizer)`` equals
  the trained vocabulary.

Output is deterministic: the same texts (in any order) give byte-identical
files: inputs are sorted, the BPE trainers used (no ``continuing_subword_prefix``)
break ties by symbol id over a sorted alphabet, the BERT vocabulary is built
without a trainer, and every config file is written by hand with sorted keys.
"""

from __future__ import annotations

import json
import logging
import os
import string
from pathlib import Path
from typing import Iterable, Mapping

logger = logging.getLogger(__name__)

__all__ = [
    "BERT_SPECIAL_TOKENS",
    "OPT_SPECIAL_TOKENS",
    "T5_SPECIAL_TOKENS",
    "build_tiny_tokenizers",
    "load_opt_tokenizer",
    "load_tiny_tokenizers",
    "tokenizer_vocab_sizes",
]

#: Special tokens in id order (id == list index) for each tokenizer.
BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
OPT_SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")
T5_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")

#: Characters every tokenizer can encode without ``[UNK]``/``<unk>`` even if
#: the training texts never contain them (digits, punctuation in prompts...).
_BASE_ALPHABET = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))

_DEFAULT_BERT_VOCAB = 384
_DEFAULT_OPT_VOCAB = 512  # includes the 256-symbol byte-level alphabet
_DEFAULT_T5_VOCAB = 384


def _write_json(path: Path, obj: Mapping) -> None:
    """Write JSON deterministically (sorted keys, fixed indent, trailing newline)."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _prepare_texts(texts: Iterable[str]) -> list[str]:
    """Sorted, non-empty texts: training must not depend on input order."""
    out = sorted(t for t in (str(x) for x in texts) if t.strip())
    if not out:
        raise ValueError("build_tiny_tokenizers needs at least one non-empty text")
    return out


def _check_vocab_ids(vocab: Mapping[str, int], specials: Iterable[str], name: str) -> None:
    """Fail loudly if a trainer ever stops putting special tokens first."""
    for want, tok in enumerate(specials):
        got = vocab.get(tok)
        if got != want:
            raise RuntimeError(f"{name}: special token {tok!r} has id {got}, expected {want}")


def _build_bert(texts: list[str], out: Path, vocab_size: int) -> None:
    """Lowercase WordPiece saved as ``vocab.txt`` for the slow ``BertTokenizer``.

    Why not ``WordPieceTrainer``: in tokenizers 0.22 it is not deterministic
    (``##`` symbols get ids in hash-map order, and merge ties are broken by
    id, so two runs learn different sub-words).  Instead the vocabulary is
    built directly: special tokens, every base character both word-initial and
    as ``##`` continuation (so any ASCII word still tokenizes without
    ``[UNK]``), then whole corpus words by descending frequency until
    ``vocab_size``.  Words are found with the ``tokenizers`` BERT normalizer and
    pre-tokenizer, i.e. exactly the pieces ``BertTokenizer`` will look up.
    """
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))

    chars = sorted(set(_BASE_ALPHABET) | {c for w in counts for c in w})
    vocab: list[str] = [*BERT_SPECIAL_TOKENS, *chars, *(f"##{c}" for c in chars)]
    if vocab_size < len(vocab):
        raise ValueError(f"bert_vocab_size={vocab_size} is below the {len(vocab)} specials + characters")
    seen = set(vocab)
    for word, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) >= vocab_size:
            break
        if word not in seen:
            vocab.append(word)
            seen.add(word)

    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.WordPiece(prefix="##")
    _check_vocab_ids(tok.get_vocab(), BERT_SPECIAL_TOKENS, "bert")

    out.mkdir(parents=True, exist_ok=True)
    tok.model.save(str(out))  # -> vocab.txt, one token per line in id order
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "BertTokenizer",
            "clean_up_tokenization_spaces": True,  # "circle ?" -> "circle?" on decode
            "do_lower_case": True,
            "strip_accents": None,
            "tokenize_chinese_chars": True,
            "model_max_length": 512,
            "unk_token": "[UNK]",
            "sep_token": "[SEP]",
            "pad_token": "[PAD]",
            "cls_token": "[CLS]",
            "mask_token": "[MASK]",
        },
    )
    _write_json(
        out / "special_tokens_map.json",
        {
            "unk_token": "[UNK]",
            "sep_token": "[SEP]",
            "pad_token": "[PAD]",
            "cls_token": "[CLS]",
            "mask_token": "[MASK]",
        },
    )


def _build_opt(texts: list[str], out: Path, vocab_size: int) -> None:
    """Byte-level BPE saved as ``vocab.json``/``merges.txt`` like ``facebook/opt-*``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=0,
        show_progress=False,
        special_tokens=list(OPT_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    _check_vocab_ids(tok.get_vocab(), OPT_SPECIAL_TOKENS, "opt")

    out.mkdir(parents=True, exist_ok=True)
    tok.model.save(str(out))  # -> vocab.json + merges.txt ("#version: 0.2" header)
    specials = {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    _write_json(
        out / "tokenizer_config.json",
        {
            # No config.json travels with this dir, so name the class explicitly;
            # AutoTokenizer maps it to GPT2TokenizerFast when use_fast=True.
            "tokenizer_class": "GPT2Tokenizer",
            "add_bos_token": True,
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,  # byte-level decode is already exact
            "errors": "replace",
            **specials,
        },
    )
    _write_json(out / "special_tokens_map.json", specials)


def _build_t5(texts: list[str], out: Path, vocab_size: int) -> None:
    """Metaspace BPE saved as ``tokenizer.json`` for ``T5TokenizerFast``.

    Why BPE and not Unigram (what real T5 uses): the ``tokenizers`` Unigram
    trainer collapses on a ~100-word corpus (~100-150 pieces, "color" split into
    single letters), while BPE keeps every corpus word as one token.  The
    ``T5TokenizerFast`` wrapper does not care which model ``tokenizer.json``
    holds; the SentencePiece-style ``▁`` pre-tokenizer/decoder are kept.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # Real T5: NFKC-ish normalisation + collapse runs of spaces.  Lowercasing is
    # added because the trained alphabet is lowercase only (no byte fallback).
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Lowercase(), normalizers.Replace(Regex(" {2,}"), " ")]
    )
    # Metaspace as in T5, then punctuation isolated (SentencePiece never merges
    # letters with punctuation across its script boundary, so "circle?" must
    # not become one token).  The Metaspace decoder restores exact spacing.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True),
            pre_tokenizers.Punctuation(behavior="isolated"),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=0,
        show_progress=False,
        special_tokens=list(T5_SPECIAL_TOKENS),
        initial_alphabet=_BASE_ALPHABET + ["\u2581"],
    )
    tok.train_from_iterator(texts, trainer=trainer)
    _check_vocab_ids(tok.get_vocab(), T5_SPECIAL_TOKENS, "t5")
    eos_id = T5_SPECIAL_TOKENS.index("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos_id)]
    )

    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"), pretty=True)
    specials = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "T5Tokenizer",
            # extra_ids=0: no <extra_id_*> sentinels, so len(tokenizer) is the
            # trained vocab and the LM head can be sized to it exactly.
            "extra_ids": 0,
            "clean_up_tokenization_spaces": False,  # Metaspace decode is already exact
            "additional_special_tokens": [],
            "model_max_length": 512,
            **specials,
        },
    )
    _write_json(out / "special_tokens_map.json", specials)


def build_tiny_tokenizers(
    texts: Iterable[str],
    out_dir: str | os.PathLike,
    *,
    bert_vocab_size: int = _DEFAULT_BERT_VOCAB,
    opt_vocab_size: int = _DEFAULT_OPT_VOCAB,
    t5_vocab_size: int = _DEFAULT_T5_VOCAB,
) -> dict[str, Path]:
    """Train BERT/OPT/T5-style tokenizers on ``texts`` and save them under ``out_dir``.

    Returns ``{"bert": out_dir/"bert", "opt": out_dir/"opt", "t5": out_dir/"t5"}``.
    Vocab sizes are upper bounds: on a ~100-word corpus the trainers may stop
    earlier once every word is a single token; use :func:`tokenizer_vocab_sizes`
    for the real sizes.  Existing files in the three sub-directories are
    overwritten.
    """
    if opt_vocab_size <= 256 + len(OPT_SPECIAL_TOKENS):
        raise ValueError("opt_vocab_size must exceed the 256-byte alphabet plus OPT's 4 special tokens")
    corpus = _prepare_texts(texts)
    root = Path(out_dir)
    paths = {"bert": root / "bert", "opt": root / "opt", "t5": root / "t5"}
    _build_bert(corpus, paths["bert"], bert_vocab_size)
    _build_opt(corpus, paths["opt"], opt_vocab_size)
    _build_t5(corpus, paths["t5"], t5_vocab_size)
    return paths


def load_tiny_tokenizers(paths: Mapping[str, str | os.PathLike]) -> dict:
    """Load the tokenizers with the same calls LAVIS 1.0.2 uses for BLIP-2.

    ``bert`` gets ``[DEC]`` added as ``bos_token`` (``Blip2Base.init_tokenizer``),
    ``opt`` is :func:`load_opt_tokenizer` (what our ``Blip2OPTExt`` uses), ``t5`` is
    ``T5TokenizerFast`` (``Blip2T5``).  Only keys present in ``paths`` are loaded.
    """
    from transformers import BertTokenizer, T5TokenizerFast

    out = {}
    if "bert" in paths:
        bert = BertTokenizer.from_pretrained(str(paths["bert"]))
        bert.add_special_tokens({"bos_token": "[DEC]"})
        out["bert"] = bert
    if "opt" in paths:
        out["opt"] = load_opt_tokenizer(str(paths["opt"]))
    if "t5" in paths:
        out["t5"] = T5TokenizerFast.from_pretrained(str(paths["t5"]))
    return out


def tokenizer_vocab_sizes(paths: Mapping[str, str | os.PathLike]) -> dict[str, int]:
    """``len(tokenizer)`` per key, i.e. the embedding / LM-head rows a model needs.

    Why ``len`` and not ``vocab_size``: it counts added special tokens too.
    ``bert`` includes the ``[DEC]`` token LAVIS adds (raw ``vocab.txt`` + 1),
    matching ``Qformer.resize_token_embeddings(len(self.tokenizer))``.
    """
    return {name: len(tok) for name, tok in load_tiny_tokenizers(paths).items()}


#: Strings on which the fast OPT tokenizer must give the slow one's ids before it replaces it: prompt and
#: caption shapes, the "\n" that ends a caption, runs of spaces, tabs, non-ASCII letters, emoji, special-token text.
OPT_PROBES = (
    "a photo of a red circle left of a blue square\n", "Question: what color is the circle? Answer:", "\n", " ",
    "", "  two  spaces", "tab\there", "a\n\nb", " leading", "trailing ", "UPPER lower 123 4.5e-3 !?",
    "Caf\u00e9 na\u00efve \u2014 \u201cquotes\u201d \U0001F600 \u65e5\u672c \u00a0nbsp", "<s> </s> <pad> <unk>",
)


def load_opt_tokenizer(source: str, fast: bool = True):
    """OPT's tokenizer as LAVIS loads it (``AutoTokenizer``, ``GPT2Tokenizer`` files, ``</s>`` prepended), fast.

    Why: LAVIS asks for the slow tokenizer (``use_fast=False``), whose Python BPE runs on every training step
    (4.4 ms per batch of 16 captions against 1.2 ms for the Rust one, ~6% of the tiny OPT step). The fast one
    is converted from the same files on load; it is used only when it gives the slow one's ids on
    :data:`OPT_PROBES` with and without special tokens, otherwise the slow one is returned with a warning.
    ``fast=False`` gives LAVIS's slow tokenizer.

    Threads: like every Rust tokenizer (``T5TokenizerFast`` too), concurrent calls whose padding or truncation
    settings differ can fail with ``RuntimeError: Already borrowed`` (the settings live on the shared Rust object);
    calls with the same settings run concurrently fine. Our inference path tokenises prompts with one setting
    (left padding, no truncation); a server that mixes settings across threads needs one tokenizer per thread."""
    from transformers import AutoTokenizer

    slow = AutoTokenizer.from_pretrained(source, use_fast=False)
    if not fast:
        return slow
    quick = AutoTokenizer.from_pretrained(source, use_fast=True)
    for text in OPT_PROBES:
        for special in (True, False):
            if quick(text, add_special_tokens=special).input_ids != slow(text, add_special_tokens=special).input_ids:
                logger.warning(
                    "%s: the fast OPT tokenizer gives other ids than the slow one for %r; using the slow one", source, text)
                return slow
    if (len(quick), quick.pad_token_id, quick.bos_token_id, quick.eos_token_id) != (
            len(slow), slow.pad_token_id, slow.bos_token_id, slow.eos_token_id):
        logger.warning("%s: the fast OPT tokenizer's vocabulary differs; using the slow one", source)
        return slow
    return quick


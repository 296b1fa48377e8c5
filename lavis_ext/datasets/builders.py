"""LAVIS builders ``wds_caption`` and ``wds_vqa``: webdataset shards -> :class:`WdsSplitDataset` per split.

They override ``build_datasets`` because there is nothing to download and no annotation files: the
shards carry their text, and the lengths come from ``sizes.json`` or the config. The split named
``train`` is read in a ``*_train`` mode with shuffling; every other split in an ``*_eval`` mode, in order.

``build_info`` keys (defaults in ``lavis_ext/configs/datasets/wds_{caption,vqa}/defaults.yaml``):
``root`` (patterns and the sizes file are relative to it), ``sizes``, ``shards`` ({split: pattern};
null = every split in the sizes file with its pattern), ``lengths`` ({split: N}, wins over the sizes
file), ``split_by`` and ``seed`` (see :mod:`lavis_ext.datasets.wds_pipeline`), ``resampled`` (true: the
train split samples shards with replacement forever and needs no length, :mod:`lavis_ext.datasets.wds_stream`).

Lengths, first found wins: ``lengths.<split>``; the sizes file's entry for the split; without either,
img2dataset's ``NNNNN_stats.json`` beside every local shard of the split (:mod:`lavis_ext.datasets.shard_index`
says what that assumes). ``lavis-ext shards index ROOT`` writes a sizes file for any shards.

Dataset-level keys of these builders (``WdsBuilder.dataset_options``, with their defaults): ``on_bad_record``
(``skip`` | ``error``, :mod:`lavis_ext.datasets.bad_records`), ``shuffle_buffer``, ``decode_cache_mb`` and, for
``wds_vqa``, the question ``prompt``.
"""
from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar

from lavis.common.registry import registry
from lavis.datasets.builders.base_dataset_builder import BaseDatasetBuilder
from omegaconf import DictConfig, OmegaConf

from lavis_ext.datasets.shard_index import img2dataset_counts, length_from_stats
from lavis_ext.datasets.wds_pipeline import (
    DEFAULT_DECODE_CACHE_MB, DEFAULT_VQA_PROMPT, MODES, WdsSplitDataset, expand_shards, read_sizes, split_length,
)
from lavis_ext.datasets.wds_stream import ResampledWdsDataset

logger = logging.getLogger(__name__)

_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "datasets"
BUILD_INFO_KEYS = ("root", "sizes", "shards", "lengths", "split_by", "seed", "resampled")


def read_build_info(config, valid_keys, name: str) -> dict:
    """A builder's ``build_info`` as a plain dict; an unknown key fails naming the closest valid one."""
    node = config.get("build_info") or {}
    info = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    for key in info:
        if key not in valid_keys:
            close = difflib.get_close_matches(str(key), valid_keys, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"unknown key {key!r} in datasets.{name}.build_info; {hint}valid: {', '.join(valid_keys)}")
    return info


class OptionsBuilder(BaseDatasetBuilder):
    """A builder with its own dataset-level keys (next to ``build_info``), defaults stated once in
    ``dataset_options``: the config check (:func:`lavis_ext.config.dataset_keys_for`) accepts exactly these plus the
    keys every builder has, and the builder reads them through :meth:`option`."""

    dataset_options: ClassVar[Mapping[str, Any]] = MappingProxyType({})

    def option(self, key: str):
        """The project's value of one of this builder's ``dataset_options``, else its default."""
        return self.config.get(key, self.dataset_options[key])


# The keys of every builder of ours: the bad-data policy (lavis_ext.datasets.bad_records: skip | error; None = skip).
BAD_RECORD_OPTION = MappingProxyType({"on_bad_record": None})
# The question prompt of a VQA builder, applied once by the dataset at training and evaluation alike.
VQA_PROMPT_OPTION = MappingProxyType({"prompt": DEFAULT_VQA_PROMPT})


class WdsBuilder(OptionsBuilder):
    """Shared logic; subclasses set ``kind`` ("caption" or "vqa") and the default YAML."""

    kind = "caption"
    DATASET_CONFIG_DICT: dict = {}
    dataset_options = MappingProxyType({
        **BAD_RECORD_OPTION,
        "shuffle_buffer": 1000,  # train split only: samples held for shuffling
        "decode_cache_mb": DEFAULT_DECODE_CACHE_MB,  # decoded images kept for their other captions/questions
    })

    @property
    def name(self) -> str:
        return f"wds_{self.kind}"

    def build_datasets(self) -> dict:
        """Returns ``{split: WdsSplitDataset}``; no download and no barrier (every rank reads the shards).

        Raises:
            ValueError: unknown ``build_info`` keys, no splits, or a split with no known length.
            FileNotFoundError: a shard pattern or the sizes file that is needed but missing.
        """
        self.build_processors()
        info = self._build_info()
        root = info.get("root")
        sizes = self._sizes(info, root)
        shards = info.get("shards") or {}
        if not shards:
            if sizes is None:
                raise ValueError(
                    f"datasets.{self.name}.build_info gives no shards and no sizes file; set build_info.shards "
                    f"(e.g. {{train: 'train/shard-{{000000..000007}}.tar'}}) or build_info.sizes"
                )
            shards = {split: entry["shards"] for split, entry in sizes["splits"].items() if "shards" in entry}
        if not shards:
            raise ValueError(f"datasets.{self.name}: no splits to build (the sizes file lists no shard patterns)")
        return {split: self._build_split(split, pattern, info, root, sizes) for split, pattern in shards.items()}

    # ---- helpers ------------------------------------------------------------------------------
    def _build_info(self) -> dict:
        return read_build_info(self.config, BUILD_INFO_KEYS, self.name)

    def _sizes(self, info: dict, root) -> dict | None:
        path = info.get("sizes")
        if not path:
            return None
        if root is not None and not os.path.isabs(path):
            path = os.path.join(str(root), path)
        if info.get("shards") and not os.path.isfile(path):
            return None  # shards given: lengths come from build_info.lengths or img2dataset stats (_build_split)
        return read_sizes(path)  # a missing file raises FileNotFoundError naming the path and the options

    def _build_split(self, split: str, pattern, info: dict, root, sizes: dict | None) -> WdsSplitDataset:
        train = split == "train"
        mode = f"{self.kind}_{'train' if train else 'eval'}"
        lengths = info.get("lengths") or {}
        urls = expand_shards(list(pattern) if isinstance(pattern, (list, tuple)) else pattern, root)
        stats = img2dataset_counts(urls)  # read once: the length below and the dataset's per-shard counts
        from_stats = length_from_stats(urls, stats, MODES[mode])
        if split in lengths:
            length = int(lengths[split])
        elif sizes is not None and split in sizes["splits"]:
            length = split_length(sizes, split, mode)
        elif from_stats is not None:
            length = from_stats
        elif train and info.get("resampled"):
            length = None  # an endless stream: runner_iter needs no length
        else:
            raise ValueError(
                f"datasets.{self.name}: split {split!r} has no length; count the shards into a sizes file "
                f"(`lavis-ext shards index {root or '<root>'}`, then build_info.sizes=sizes.json), or set "
                f"build_info.lengths.{split} (number of {MODES[mode]}); img2dataset's NNNNN_stats.json beside "
                "every shard also give it (images and captions only)"
            )
        entry = (sizes or {}).get("splits", {}).get(split, {})
        counts = {**stats, **{os.path.join(str(root), rel) if root is not None and not os.path.isabs(rel) else rel: n
                              for rel, n in (entry.get("shard_samples") or {}).items()}}
        proc = "train" if train else "eval"
        kwargs = {"prompt": self.option("prompt")} if "prompt" in self.dataset_options else {}
        stream_cls = ResampledWdsDataset if train and info.get("resampled") else WdsSplitDataset
        dataset = stream_cls(
            urls=urls,  # expanded and joined to root above
            mode=mode,
            vis_processor=self.vis_processors[proc],
            text_processor=self.text_processors[proc],
            length=length,
            shuffle_buffer=int(self.option("shuffle_buffer")) if train else 0,
            seed=int(info.get("seed") or 0),
            split_by=info.get("split_by") or "auto",
            name=f"{self.name}/{split}",
            on_bad_record=self.option("on_bad_record"),  # checked by the dataset, naming datasets.<name>
            decode_cache_mb=self.option("decode_cache_mb"),  # checked by the dataset
            shard_samples=counts,
            **kwargs,
        )
        logger.info("built %r", dataset)
        return dataset


@registry.register_builder("wds_caption")
class WdsCaptionBuilder(WdsBuilder):
    """Captioning: train = (image, caption) pairs; val/test = images with all reference captions."""

    kind = "caption"
    DATASET_CONFIG_DICT = {"default": str(_CONFIGS / "wds_caption" / "defaults.yaml")}


@registry.register_builder("wds_vqa")
class WdsVQABuilder(WdsBuilder):
    """VQA: one sample per question; train gives text_output, val/test all ten answers."""

    kind = "vqa"
    DATASET_CONFIG_DICT = {"default": str(_CONFIGS / "wds_vqa" / "defaults.yaml")}
    dataset_options = MappingProxyType({**WdsBuilder.dataset_options, **VQA_PROMPT_OPTION})

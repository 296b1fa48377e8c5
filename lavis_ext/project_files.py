"""Project YAMLs that inherit: ``_base_: ../_base/caption_coco_ft.yaml`` (or a list of paths).

The 44 paper recipes share most of their lines; each now says only what differs from its bases, as mmengine's
``_base_``. Every reader of a project file (``train.py``/``evaluate.py`` through :func:`lavis_ext.config.project_config`,
the strict name check, ``lavis_ext.inference``, the recipe table, the release tests, ``run_scripts/launch.sh``) calls
:func:`load_project_yaml`, so a recipe means the same thing everywhere. This module needs only OmegaConf (no LAVIS,
no torch): the launcher asks it for ``run.evaluate`` in a fraction of a second.

Rules: paths are relative to the file that names them; bases may have bases; bases merge in the order listed, then
the file's own keys over them (``OmegaConf.merge``: mappings merge key by key, lists and scalars are replaced, never
concatenated). A key cannot be deleted by a child: keep such keys out of the base. Interpolations (``${oc.env:...}``)
are kept unresolved, as in a plain file.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

BASE_KEY = "_base_"


class ProjectFileError(ValueError):
    """A project file's ``_base_`` chain is broken: a missing file, a cycle, or a value that is not a path."""


def load_project_yaml(path: str | os.PathLike) -> DictConfig:
    """The project file at ``path`` with its ``_base_`` chain merged in (and the ``_base_`` key removed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"project file {str(path)!r} does not exist")
    return _load(path, ())


def _load(path: Path, chain: tuple[Path, ...]) -> DictConfig:
    here = path.resolve()
    if here in chain:
        loop = " -> ".join(str(p) for p in (*chain[chain.index(here):], here))
        raise ProjectFileError(f"{chain[-1]}: {BASE_KEY} makes a cycle ({loop}); remove one of these {BASE_KEY} entries")
    cfg = OmegaConf.load(path)
    if not isinstance(cfg, DictConfig):
        raise ProjectFileError(f"{path}: a project file is a mapping (model, datasets, run), got a {type(cfg).__name__}")
    if BASE_KEY not in cfg:
        return cfg
    bases = cfg[BASE_KEY]
    del cfg[BASE_KEY]
    if isinstance(bases, str):
        bases = [bases]
    elif not (isinstance(bases, ListConfig) and all(isinstance(b, str) for b in bases)):
        raise ProjectFileError(
            f"{path}: {BASE_KEY} must be a path or a list of paths relative to this file, "
            f"got {OmegaConf.to_container(bases) if isinstance(bases, (DictConfig, ListConfig)) else bases!r}"
        )
    merged = OmegaConf.create()
    for base in bases:
        base_path = path.parent / base
        if not base_path.is_file():
            raise ProjectFileError(
                f"{path}: {BASE_KEY} names {base!r}, which does not exist ({base_path}); "
                "paths are relative to the file that names them"
            )
        merged = OmegaConf.merge(merged, _load(base_path, (*chain, here)))
    return OmegaConf.merge(merged, cfg)


def main(argv=None) -> int:
    """``python -m lavis_ext.project_files FILE [--get KEY]``: the file with its bases merged, or one value."""
    parser = argparse.ArgumentParser(description="Print a project YAML with its _base_ chain merged in.")
    parser.add_argument("path")
    parser.add_argument("--get", metavar="KEY", help="print one dotted key (e.g. run.evaluate); absent prints nothing")
    args = parser.parse_args(argv)
    cfg = load_project_yaml(args.path)
    if args.get:
        value = OmegaConf.select(cfg, args.get, default=None)
        if value is not None:
            print(OmegaConf.to_yaml(value).rstrip() if isinstance(value, (DictConfig, ListConfig)) else value)
    else:
        sys.stdout.write(OmegaConf.to_yaml(cfg))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

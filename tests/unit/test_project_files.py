"""`_base_` inheritance of project YAMLs (lavis_ext.project_files): merge order, list replacement, and clear
errors for a missing base, a cycle and a bad value."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from lavis_ext.project_files import ProjectFileError, load_project_yaml, main


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_bases_merge_in_order_child_wins_lists_replaced(tmp_path):
    write(tmp_path / "_base/runtime.yaml", "run: {seed: 42, device: cuda, splits: [train, val]}\n")
    write(tmp_path / "_base/caption.yaml", "_base_: runtime.yaml\nrun: {task: captioning_ext, seed: 7}\nmodel: {arch: a}\n")
    write(tmp_path / "_base/t5.yaml", "model: {arch: blip2_t5_ext}\n")
    child = write(tmp_path / "llm/recipe.yaml", "_base_: [../_base/caption.yaml, ../_base/t5.yaml]\nrun: {splits: [test]}\n")
    cfg = load_project_yaml(child)
    assert OmegaConf.to_container(cfg) == {
        "run": {"seed": 7, "device": "cuda", "splits": ["test"], "task": "captioning_ext"},
        "model": {"arch": "blip2_t5_ext"},
    }


def test_interpolations_stay_unresolved(tmp_path):
    write(tmp_path / "base.yaml", "datasets: {d: {root: '${oc.env:COCO_ROOT,/data/coco}'}}\n")
    cfg = load_project_yaml(write(tmp_path / "c.yaml", "_base_: base.yaml\n"))
    assert OmegaConf.to_container(cfg, resolve=False)["datasets"]["d"]["root"] == "${oc.env:COCO_ROOT,/data/coco}"


def test_missing_base_names_the_file_and_the_key(tmp_path):
    child = write(tmp_path / "c.yaml", "_base_: [nope.yaml]\nrun: {}\n")
    with pytest.raises(ProjectFileError, match=r"c\.yaml: _base_ names 'nope\.yaml', which does not exist"):
        load_project_yaml(child)


def test_cycle_is_named(tmp_path):
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ProjectFileError, match=r"b\.yaml: _base_ makes a cycle \(.*a\.yaml -> .*b\.yaml -> .*a\.yaml\)"):
        load_project_yaml(tmp_path / "a.yaml")


def test_bad_values(tmp_path):
    with pytest.raises(ProjectFileError, match=r"_base_ must be a path or a list of paths.*got \{'x': 1\}"):
        load_project_yaml(write(tmp_path / "c.yaml", "_base_: {x: 1}\n"))
    with pytest.raises(FileNotFoundError, match="absent.yaml"):
        load_project_yaml(tmp_path / "absent.yaml")


def test_cli_prints_one_value(tmp_path, capsys):
    write(tmp_path / "base.yaml", "run: {evaluate: true}\n")
    assert main([str(write(tmp_path / "c.yaml", "_base_: base.yaml\n")), "--get", "run.evaluate"]) == 0
    assert capsys.readouterr().out.strip() == "True"

"""A project's own modules (outside the package) load through its ``custom_imports`` key: their registry names
pass the strict config check, the run's saved config records them, and a missing module fails clearly."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
from lavis.common.registry import registry
from omegaconf import OmegaConf

from lavis_ext import cli
from lavis_ext.custom_imports import import_custom_modules

REPO = Path(__file__).resolve().parents[2]

MODULE = '''
from lavis.common.registry import registry
from lavis_ext.tasks.captioning import CaptionTaskExt


@registry.register_task("{task}")
class OutsideTask(CaptionTaskExt):
    """A research task that lives outside lavis_ext."""
'''


def project(tmp_path: Path, module: str, task: str) -> Path:
    """A project folder: its module beside a YAML that is the demo's with the task swapped."""
    (tmp_path / f"{module}.py").write_text(MODULE.format(task=task))
    cfg = OmegaConf.load(REPO / "projects" / "tiny" / "caption_opt.yaml")
    cfg.custom_imports = [module]
    cfg.run.task = task
    path = tmp_path / "project.yaml"
    OmegaConf.save(cfg, path)
    return path


def test_a_task_outside_the_package_passes_the_config_check(synthetic_root, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the module is found beside the YAML, not through the working directory
    path = project(tmp_path, "outside_task_mod", "outside_task")
    cfg = cli.load_config(argparse.Namespace(cfg_path=str(path), options=None))
    assert registry.get_task_class("outside_task").__name__ == "OutsideTask"
    assert cfg.config.custom_imports == ["outside_task_mod"]
    assert cfg.config.custom_imports_dir == str(tmp_path.resolve())  # where a checkpoint's loader looks


def test_without_the_key_the_task_name_is_refused(synthetic_root, tmp_path):
    path = project(tmp_path, "unlisted_task_mod", "unlisted_task")
    cfg = OmegaConf.load(path)
    del cfg["custom_imports"]
    OmegaConf.save(cfg, path)
    with pytest.raises(ValueError, match="unlisted_task"):
        cli.load_config(argparse.Namespace(cfg_path=str(path), options=None))


def test_a_missing_module_names_the_key_the_value_and_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"custom_imports: module 'no_such_research_mod' not found .*PYTHONPATH"):
        import_custom_modules(["no_such_research_mod"], tmp_path)
    with pytest.raises(ValueError, match="not a module name"):
        import_custom_modules(["tasks/caption.py"], tmp_path)


def test_a_module_whose_own_import_fails_keeps_its_traceback(tmp_path):
    (tmp_path / "broken_research_mod.py").write_text("import a_dependency_nobody_installed\n")
    with pytest.raises(ModuleNotFoundError, match="a_dependency_nobody_installed"):
        import_custom_modules("broken_research_mod", tmp_path)
    sys.modules.pop("broken_research_mod", None)

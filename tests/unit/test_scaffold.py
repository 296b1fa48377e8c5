"""`lavis-ext new task NAME --project DIR`: the guide's steps, run literally in an empty folder, pass and change no
file of lavis-ext; the file count the guide states is what the scaffold writes; bad names and existing files
are refused; a task's own ``run_options`` are valid for that task only."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from lavis_ext import scaffold
from lavis_ext.config import ConfigError, check_keys

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "docs" / "adding_a_task.md"


def guide_steps() -> list[list[str]]:
    """The commands of the guide's `## Steps` section (its first bash block), one per line."""
    section = GUIDE.read_text().split("## Steps", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line) for line in block.splitlines() if line.strip() and not line.startswith("#")]


def guide_file_count() -> tuple[int, int]:
    new, edited = re.search(r"\*\*Files: (\d+) new, (\d+) edited\.\*\*", GUIDE.read_text()).groups()
    return int(new), int(edited)


def package_files() -> dict[str, float]:
    """Every file of the installed package with its modification time (the scaffold must change none)."""
    return {str(p): p.stat().st_mtime for p in (REPO / "lavis_ext").rglob("*") if p.is_file() and "__pycache__" not in p.parts}


# how the guide's programs are started here: this interpreter, without relying on the venv's bin on PATH
PROGRAMS = {
    "lavis-ext": [sys.executable, "-W", "ignore", "-c", "import sys; from lavis_ext.cli import main; sys.exit(main())"],
    "pytest": [sys.executable, "-m", "pytest", "-p", "no:cacheprovider"],
}


def test_the_guides_steps_pass_in_an_empty_folder_and_change_no_file_of_lavis_ext(tmp_path, synthetic_root):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LAVIS_EXT_DATA": str(synthetic_root)}
    env.pop("PYTHONPATH", None)
    before = package_files()
    steps = guide_steps()
    assert [step[0] for step in steps] == ["lavis-ext", "pytest"], steps
    outputs = []
    for program, *args in steps:
        proc = subprocess.run([*PROGRAMS[program], *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{program} {args}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        outputs.append(proc.stdout)
    name, project = steps[0][3], steps[0][steps[0].index("--project") + 1]
    created = re.findall(r"^created (\S+)", outputs[0], re.M)
    assert (len(created), 0) == guide_file_count()
    assert sorted(created) == sorted(f"{project}/{t.format(name=name)}" for t in scaffold.TASK_FILES.values())
    assert "2 passed" in outputs[1], outputs[1][-2000:]
    assert package_files() == before


def test_the_guide_lists_exactly_the_files_the_scaffold_writes():
    table = re.findall(r"^\| `([^`]+)` \| (new|edited) \|", GUIDE.read_text(), re.M)
    assert sorted(path for path, _ in table) == sorted(f"DIR/{t.replace('{name}', 'NAME')}" for t in scaffold.TASK_FILES.values())
    assert {kind for _, kind in table} == {"new"} and guide_file_count() == (len(scaffold.TASK_FILES), 0)


@pytest.mark.parametrize("name", ["retrieval", "captioning", "retrieval_ext", "image_text_pretrain_ext"])
def test_a_registered_name_is_refused(name, tmp_path, capsys):
    assert scaffold.main(["task", name, "--project", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert f"task name {name!r} is already registered" in err and "choose another name" in err
    assert not (tmp_path / "p").exists()  # nothing written


@pytest.mark.parametrize("name", ["Caption", "caption-length", "1st", "class", "", "a b"])
def test_an_invalid_identifier_is_refused(name, tmp_path):
    with pytest.raises(scaffold.ScaffoldError, match="is not a lower-case Python identifier"):
        scaffold.new_task(name, tmp_path)


def test_a_module_name_already_importable_is_refused(tmp_path, monkeypatch):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "my_task_task.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "elsewhere"))
    with pytest.raises(scaffold.ScaffoldError, match=r"module 'my_task_task' already exists on sys.path"):
        scaffold.new_task("my_task", tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_an_existing_file_is_refused_and_nothing_is_written(tmp_path):
    existing = tmp_path / "my_task.yaml"
    existing.write_text("mine\n")
    with pytest.raises(scaffold.ScaffoldError, match=r"my_task.yaml' already exists"):
        scaffold.new_task("my_task", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my_task.yaml"] and existing.read_text() == "mine\n"


def test_the_generated_files_compile_and_the_yaml_imports_the_module(tmp_path):
    result = scaffold.new_task("my_task", tmp_path / "research")
    assert [p.name for p in result.created] == ["my_task_task.py", "my_task.yaml", "test_my_task.py"]
    for path in result.created[::2]:
        compile(path.read_text(), path.name, "exec")
    assert "custom_imports: [my_task_task]" in (tmp_path / "research" / "my_task.yaml").read_text()


def test_a_tasks_run_options_are_valid_for_that_task_only(monkeypatch):
    """The hook the generated module uses: `run_options` on the task class widens the check for that task."""
    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    class WithOption:
        run_options = {"report_every": 10}

    monkeypatch.setitem(registry.mapping["task_name_mapping"], "scaffold_probe", WithOption)

    def cfg(task):
        return OmegaConf.create({"run_cfg": {"task": task, "report_every": 5}, "model_cfg": {}, "datasets_cfg": {}})

    check_keys(cfg("scaffold_probe"))
    with pytest.raises(ConfigError, match=r"run.report_every is an option of task 'scaffold_probe', not of 'captioning_ext'"):
        check_keys(cfg("captioning_ext"))

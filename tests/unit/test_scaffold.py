"""`lavis-ext new task NAME`: the guide's steps, run literally in a copy of the checkout, pass; the file
count the guide states is what the scaffold writes; bad names and existing files are refused."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lavis_ext import scaffold

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


def copy_checkout(dest: Path) -> Path:
    """What a checkout has that a task needs: the package, the test fixtures and the pytest config."""
    shutil.copytree(REPO / "lavis_ext", dest / "lavis_ext", ignore=shutil.ignore_patterns("__pycache__"))
    (dest / "tests").mkdir()
    for name in ("conftest.py", "tiny_models.py"):
        shutil.copy(REPO / "tests" / name, dest / "tests" / name)
    shutil.copy(REPO / "pyproject.toml", dest / "pyproject.toml")
    return dest


# how the guide's programs are started here: the installed `lavis-ext` script and `pytest` would import the
# editable install (this repository), not the copy; the same entry points through this interpreter do not
PROGRAMS = {
    "lavis-ext": [sys.executable, "-W", "ignore", "-c", "import sys; from lavis_ext.cli import main; sys.exit(main())"],
    "pytest": [sys.executable, "-m", "pytest", "-p", "no:cacheprovider"],
}


def test_the_guides_steps_pass_in_a_fresh_checkout(tmp_path, synthetic_root):
    checkout = copy_checkout(tmp_path / "checkout")
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": "1", "LAVIS_EXT_DATA": str(synthetic_root)}
    steps = guide_steps()
    assert [step[0] for step in steps] == ["lavis-ext", "pytest"], steps
    outputs = []
    for program, *args in steps:
        proc = subprocess.run([*PROGRAMS[program], *args], cwd=checkout, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{program} {args}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        outputs.append(proc.stdout)
    name = steps[0][3]
    created = re.findall(r"^created (\S+)", outputs[0], re.M)
    edited = re.findall(r"^edited\s+(\S+)", outputs[0], re.M)
    assert (len(created), len(edited)) == guide_file_count()
    assert sorted(created) == sorted(t.format(name=name) for t in scaffold.TASK_FILES.values())
    assert "2 passed" in outputs[1], outputs[1][-2000:]
    assert f"from lavis_ext.tasks.{name} import" in (checkout / scaffold.TASK_REGISTRY_FILE).read_text()


def test_the_guide_lists_exactly_the_files_the_scaffold_touches():
    text = GUIDE.read_text()
    table = re.findall(r"^\| `([^`]+)` \| (new|edited) \|", text, re.M)
    new = sorted(t.replace("{name}", "NAME") for t in scaffold.TASK_FILES.values())
    assert sorted(path for path, kind in table if kind == "new") == new
    assert [path for path, kind in table if kind == "edited"] == [scaffold.TASK_REGISTRY_FILE]
    assert guide_file_count() == (len(scaffold.TASK_FILES), 1)


@pytest.fixture
def fake_checkout(tmp_path) -> Path:
    (tmp_path / "lavis_ext" / "tasks").mkdir(parents=True)
    (tmp_path / "lavis_ext" / "tasks" / "__init__.py").write_text('"""tasks"""\nfrom lavis_ext.tasks.a import A\n\n__all__ = ["A"]\n')
    return tmp_path


@pytest.mark.parametrize("name", ["retrieval", "captioning", "retrieval_ext", "image_text_pretrain_ext"])
def test_a_registered_name_is_refused(name, fake_checkout, capsys):
    assert scaffold.main(["task", name, "--dest", str(fake_checkout)]) == 2
    err = capsys.readouterr().err
    assert f"task name {name!r} is already registered" in err and "choose another name" in err
    assert not (fake_checkout / "projects").exists()  # nothing written


@pytest.mark.parametrize("name", ["Caption", "caption-length", "1st", "class", "", "a b"])
def test_an_invalid_identifier_is_refused(name, fake_checkout):
    with pytest.raises(scaffold.ScaffoldError, match="is not a lower-case Python identifier"):
        scaffold.new_task(name, fake_checkout)


def test_an_existing_file_is_refused_and_nothing_is_written(fake_checkout):
    existing = fake_checkout / "projects" / "tiny" / "my_task.yaml"
    existing.parent.mkdir(parents=True)
    existing.write_text("mine\n")
    before = (fake_checkout / scaffold.TASK_REGISTRY_FILE).read_text()
    with pytest.raises(scaffold.ScaffoldError, match=r"my_task.yaml' already exists"):
        scaffold.new_task("my_task", fake_checkout)
    assert not (fake_checkout / "lavis_ext" / "tasks" / "my_task.py").exists()
    assert (fake_checkout / scaffold.TASK_REGISTRY_FILE).read_text() == before and existing.read_text() == "mine\n"


def test_a_destination_that_is_not_a_checkout_is_refused(tmp_path):
    with pytest.raises(scaffold.ScaffoldError, match="is not a lavis-ext checkout"):
        scaffold.new_task("my_task", tmp_path)


def test_the_import_goes_after_the_last_task_import(fake_checkout):
    result = scaffold.new_task("my_task", fake_checkout)
    lines = (fake_checkout / scaffold.TASK_REGISTRY_FILE).read_text().splitlines()
    assert lines[2].startswith("from lavis_ext.tasks.my_task import MyTaskTask") and lines[-1] == '__all__ = ["A"]'
    assert [p.relative_to(fake_checkout).as_posix() for p in result.created] == [
        t.format(name="my_task") for t in scaffold.TASK_FILES.values()
    ]
    compile((fake_checkout / "lavis_ext/tasks/my_task.py").read_text(), "my_task.py", "exec")

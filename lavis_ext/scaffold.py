"""``lavis-ext new task NAME [--dest .]``: a registered task module, its project YAML and its test.

Adding a task is one module and one YAML (docs/adding_a_task.md); this writes both from the templates in
``lavis_ext/templates/task/``, plus a test that trains and evaluates the new project through train.py's
path, and adds the one import line that registers the module on ``lavis_ext.register()``. The generated
files pass as written, so the first edit starts from something that runs.

It refuses, before writing anything: a name that is not a lower-case Python identifier (the name is the
module, the registry key and part of the test's name), a name LAVIS's task registry already holds
(LAVIS would silently keep one of the two), and any target file that already exists.
"""
from __future__ import annotations

import argparse
import keyword
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

TEMPLATES = Path(__file__).resolve().parent / "templates"
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")

#: what ``new task NAME`` writes: template -> target, relative to the checkout (``{name}`` is filled in).
TASK_FILES = {
    "task/task_module.py.tmpl": "lavis_ext/tasks/{name}.py",
    "task/project.yaml.tmpl": "projects/tiny/{name}.yaml",
    "task/test_task.py.tmpl": "tests/unit/test_task_{name}.py",
}
#: the one existing file it edits: the import that registers the module
TASK_REGISTRY_FILE = "lavis_ext/tasks/__init__.py"


class ScaffoldError(ValueError):
    """A name or destination the scaffold refuses; nothing has been written."""


@dataclass
class Scaffold:
    """What one command wrote (``created``) and changed (``edited``), as paths under ``dest``."""

    created: list[Path] = field(default_factory=list)
    edited: list[Path] = field(default_factory=list)


def class_name_for(name: str) -> str:
    """``caption_length`` -> ``CaptionLengthTask``."""
    return "".join(part.capitalize() for part in name.split("_") if part) + "Task"


def check_task_name(name: str) -> None:
    """Raises :class:`ScaffoldError` for an invalid name or one LAVIS's task registry already holds."""
    if not NAME_PATTERN.match(name or "") or keyword.iskeyword(name):
        raise ScaffoldError(
            f"task name {name!r} is not a lower-case Python identifier (letters, digits, '_', starting with a "
            "letter; not a keyword); it becomes the module and the registry key, e.g. 'caption_length'"
        )
    import lavis_ext

    lavis_ext.register()  # LAVIS's and our tasks
    from lavis.common.registry import registry

    tasks = registry.mapping["task_name_mapping"]
    if name in tasks:
        raise ScaffoldError(
            f"task name {name!r} is already registered (by {tasks[name].__module__}.{tasks[name].__name__}); "
            f"choose another name, e.g. {name + '_v2'!r}"
        )


def new_task(name: str, dest: str | Path = ".") -> Scaffold:
    """Write the task module, project YAML and test for ``name`` into the checkout at ``dest``, and
    register the module in ``lavis_ext/tasks/__init__.py``.

    Raises:
        ScaffoldError: invalid or taken name, ``dest`` not a lavis-ext checkout, or a target that exists.
    """
    check_task_name(name)
    dest = Path(dest)
    registry_file = dest / TASK_REGISTRY_FILE
    if not registry_file.is_file():
        raise ScaffoldError(
            f"{str(dest)!r} is not a lavis-ext checkout ({TASK_REGISTRY_FILE} is missing there); "
            "run from the repository root or pass --dest <repository root>"
        )
    targets = {template: dest / target.format(name=name) for template, target in TASK_FILES.items()}
    existing = [str(path) for path in targets.values() if path.exists()]
    if existing:
        raise ScaffoldError(f"{existing[0]!r} already exists; remove it or choose another task name")
    values = {"name": name, "class_name": class_name_for(name)}
    result = Scaffold()
    for template, path in targets.items():
        text = Template((TEMPLATES / template).read_text()).substitute(values)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        result.created.append(path)
    line = f"from lavis_ext.tasks.{name} import {values['class_name']}  # noqa: F401  (lavis-ext new task)\n"
    registry_file.write_text(with_import(registry_file.read_text(), line))
    result.edited.append(registry_file)
    return result


def with_import(source: str, line: str) -> str:
    """``source`` with ``line`` after its last ``from lavis_ext.tasks.`` import (else at the end)."""
    lines = source.splitlines(keepends=True)
    last = max((i for i, text in enumerate(lines) if text.startswith("from lavis_ext.tasks.")), default=None)
    if last is None:
        return source + ("" if source.endswith("\n") or not source else "\n") + line
    return "".join([*lines[: last + 1], line, *lines[last + 1 :]])


def main(argv: list[str] | None = None) -> int:
    """``lavis-ext new task NAME [--dest DIR]``; exit code 0, or 2 with the reason on stderr."""
    parser = argparse.ArgumentParser(prog="lavis-ext new", description="Scaffold a new task for lavis-ext.")
    sub = parser.add_subparsers(dest="kind", required=True)
    task = sub.add_parser("task", help="a registered task module, a tiny project YAML and a test")
    task.add_argument("name", help="task name: module, registry key and YAML name, e.g. caption_length")
    task.add_argument("--dest", default=".", help="the lavis-ext checkout to write into (default: .)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        result = new_task(args.name, args.dest)
    except ScaffoldError as error:
        print(f"lavis-ext new {args.kind}: error: {error}", file=sys.stderr)
        return 2
    for path in result.created:
        print(f"created {path}")
    for path in result.edited:
        print(f"edited  {path}")
    print(f"next: pytest -q {TASK_FILES['task/test_task.py.tmpl'].format(name=args.name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``lavis-ext new task NAME [--project DIR]``: a research project folder with a task module, its YAML and a test.

Research code lives outside the package (docs/adding_a_task.md): the project YAML names its own modules under
``custom_imports`` (:mod:`lavis_ext.custom_imports`), which ``train.py`` imports before the config is checked.
So this writes three files into ``DIR`` (default ``research/NAME``) from the templates in
``lavis_ext/templates/task/`` and edits no file of lavis-ext. The generated test trains and evaluates the new
project through train.py's path on the tiny model and passes as written, so the first edit starts from
something that runs.

It refuses, before writing anything: a name that is not a lower-case Python identifier (the name is the
registry key and part of the module's and test's names), a name LAVIS's task registry already holds (LAVIS
would silently keep one of the two), a module name that something on ``sys.path`` already provides (it would
be imported instead of the project's), and any target file that already exists.
"""
from __future__ import annotations

import argparse
import importlib.util
import keyword
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

TEMPLATES = Path(__file__).resolve().parent / "templates"
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")
DEFAULT_PROJECT = "research/{name}"

#: what ``new task NAME`` writes: template -> file in the project folder (``{name}`` is filled in)
TASK_FILES = {
    "task/task_module.py.tmpl": "{name}_task.py",
    "task/project.yaml.tmpl": "{name}.yaml",
    "task/test_task.py.tmpl": "test_{name}.py",
}


class ScaffoldError(ValueError):
    """A name or destination the scaffold refuses; nothing has been written."""


@dataclass
class Scaffold:
    """What one command wrote: the project folder and the files created in it."""

    project: Path
    created: list[Path] = field(default_factory=list)


def class_name_for(name: str) -> str:
    """``caption_length`` -> ``CaptionLengthTask``."""
    return "".join(part.capitalize() for part in name.split("_") if part) + "Task"


def check_task_name(name: str) -> None:
    """Raises :class:`ScaffoldError` for an invalid name, one LAVIS's task registry already holds, or one whose
    module name something importable already uses."""
    if not NAME_PATTERN.match(name or "") or keyword.iskeyword(name):
        raise ScaffoldError(
            f"task name {name!r} is not a lower-case Python identifier (letters, digits, '_', starting with a "
            "letter; not a keyword); it becomes the registry key and the module name, e.g. 'caption_length'"
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
    module = f"{name}_task"
    spec = importlib.util.find_spec(module)
    if spec is not None:
        raise ScaffoldError(
            f"module {module!r} already exists on sys.path ({spec.origin}); custom_imports would import it instead "
            "of the project's: choose another task name"
        )


def new_task(name: str, project: str | Path | None = None) -> Scaffold:
    """Write the task module, project YAML and test for ``name`` into ``project`` (default ``research/NAME``).

    Raises:
        ScaffoldError: invalid or taken name, or a target file that exists.
    """
    check_task_name(name)
    folder = Path(project if project is not None else DEFAULT_PROJECT.format(name=name))
    targets = {template: folder / target.format(name=name) for template, target in TASK_FILES.items()}
    existing = [str(path) for path in targets.values() if path.exists()]
    if existing:
        raise ScaffoldError(f"{existing[0]!r} already exists; remove it, choose another task name or --project")
    values = {"name": name, "class_name": class_name_for(name)}
    result = Scaffold(project=folder)
    folder.mkdir(parents=True, exist_ok=True)
    for template, path in targets.items():
        path.write_text(Template((TEMPLATES / template).read_text()).substitute(values))
        result.created.append(path)
    return result


def main(argv: list[str] | None = None) -> int:
    """``lavis-ext new task NAME [--project DIR]``; exit code 0, or 2 with the reason on stderr."""
    parser = argparse.ArgumentParser(prog="lavis-ext new", description="Scaffold a research project for lavis-ext.")
    sub = parser.add_subparsers(dest="kind", required=True)
    task = sub.add_parser("task", help="a project folder: a task module, its YAML (custom_imports) and a test")
    task.add_argument("name", help="task name: registry key, module and YAML name, e.g. caption_length")
    task.add_argument("--project", default=None,
                      help=f"the folder to write into (default: {DEFAULT_PROJECT.format(name='NAME')})")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        result = new_task(args.name, args.project)
    except ScaffoldError as error:
        print(f"lavis-ext new {args.kind}: error: {error}", file=sys.stderr)
        return 2
    for path in result.created:
        print(f"created {path}")
    print(f"next: pytest -q {result.project}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Research code outside the package: a project's own modules, imported through its ``custom_imports`` key.

As mmengine's ``custom_imports``: a project YAML names the modules that register its tasks, models or
builders, and they are imported before the config is checked, so their registry names are valid::

    custom_imports: [caption_length_task]      # research/caption_length_task.py beside the YAML
    run:
      task: caption_length

A module is looked up on ``sys.path`` plus the YAML file's folder and the current directory (appended, so they
never shadow an installed package). ``lavis-ext new task NAME --project DIR`` writes such a folder and edits no
file of lavis-ext. A saved run records the key, so ``lavis_ext.inference.load`` imports the same modules (from
the run's project folder, recorded as ``custom_imports_dir``, or the current directory).
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Iterable

KEY = "custom_imports"
DIR_KEY = "custom_imports_dir"


def import_custom_modules(names: Iterable[str] | str | None, *search_dirs: str | Path) -> list[str]:
    """Import each module of ``names`` (a list, or one name), with ``search_dirs`` added to ``sys.path``.

    Raises:
        ValueError: a name that is not a module path, or a module that cannot be found, naming the key, the
            value, where it was looked for and the fix.
    """
    if names is None:
        return []
    names = [names] if isinstance(names, str) else [str(name) for name in names]
    dirs = [str(Path(d).resolve()) for d in (*search_dirs, Path.cwd()) if d is not None]
    for folder in dirs:
        if folder not in sys.path:
            sys.path.append(folder)
    imported = []
    for name in names:
        if not name or not all(part.isidentifier() for part in name.split(".")):
            raise ValueError(
                f"{KEY}: {name!r} is not a module name; write dotted module names (e.g. caption_length_task or "
                "my_research.tasks), not file paths"
            )
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name is None or not name.startswith(error.name):
                raise  # the module exists but imports something missing: its own traceback says what
            raise ValueError(
                f"{KEY}: module {name!r} not found (looked on sys.path and in {dirs}); put the project's modules "
                "beside its YAML, run from their folder, or add it to PYTHONPATH"
            ) from error
        imported.append(name)
    return imported

"""Import a script or test file that is not part of a package, by its path in the repository."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def load(relative: str, name: str | None = None) -> ModuleType:
    """The module at ``ROOT / relative`` (e.g. ``"scripts/handout.py"``), executed afresh, under
    ``name`` (default: the file's stem)."""
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

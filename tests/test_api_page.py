"""book/api.md documents every module of anchor_lib, and only modules that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_api_reference_covers_every_module():
    modules = {p.stem for p in (ROOT / "anchor_lib").glob("*.py")} - {"__init__", "__main__"}
    page = (ROOT / "book" / "api.md").read_text()
    documented = re.findall(r"^\.\. automodule:: anchor_lib\.(\w+)$", page, re.M)
    assert len(documented) == len(set(documented)), "a module is documented twice"
    assert set(documented) == modules, (
        f"missing from book/api.md: {sorted(modules - set(documented))}; "
        f"not a module: {sorted(set(documented) - modules)}")
    # Each has its own section, named after it.
    assert set(re.findall(r"^## `anchor_lib\.(\w+)`$", page, re.M)) == modules

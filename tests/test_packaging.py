"""The pins stay in one place: environment.yml mirrors constraints.txt, and the key pins hold."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pins(text: str, pattern: str) -> dict[str, str]:
    return {m.group(1).lower().replace("_", "-"): m.group(2)
            for m in re.finditer(pattern, text, flags=re.MULTILINE)}


def test_environment_yml_mirrors_constraints():
    constraints = _pins((ROOT / "constraints.txt").read_text(), r"^([\w.\-]+)==(\S+)$")
    conda = _pins((ROOT / "environment.yml").read_text(), r"^\s*- ([\w.\-]+)==(\S+)$")
    assert conda, "environment.yml pins nothing"
    mismatched = {k: (v, constraints.get(k)) for k, v in conda.items() if constraints.get(k) != v}
    assert not mismatched, f"environment.yml and constraints.txt disagree: {mismatched}"


def test_key_pins():
    constraints = _pins((ROOT / "constraints.txt").read_text(), r"^([\w.\-]+)==(\S+)$")
    assert constraints["torch"] == "2.14.1" and constraints["torchvision"] == "0.29.1"
    assert constraints["jupyter-book"].startswith("1.")  # 2.x downloads its theme at build time
    assert constraints["torchattacks"] == "3.5.1"


def test_readme_shows_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert "make book" in readme and "make test" in readme

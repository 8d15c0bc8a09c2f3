"""``_ext/unique_scripts.py`` on a one-page Sphinx project with the book's theme and the two
extensions whose inline scripts reached every page twice (seconds, no book build)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("sphinx_thebe")
pytest.importorskip("sphinx_togglebutton")
pytest.importorskip("sphinx_book_theme")

from sphinx.application import Sphinx  # noqa: E402

EXT = Path(__file__).resolve().parent.parent / "_ext"


def _page(tmp_path: Path, extensions: list[str]) -> str:
    """The built ``index.html`` of a one-page project with ``extensions``."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "conf.py").write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(EXT)!r})\n"
        f"extensions = {extensions!r}\n"
        "html_theme = 'sphinx_book_theme'\n")
    (src / "index.rst").write_text("Page\n====\n\nText.\n")
    app = Sphinx(str(src), str(src), str(tmp_path / "out"), str(tmp_path / "doctrees"), "html",
                 status=None, warning=None, freshenv=True)
    app.build()
    return (tmp_path / "out" / "index.html").read_text(encoding="utf-8")


def _count(page: str, text: str) -> int:
    return len(re.findall(re.escape(text), page))


def test_the_inline_scripts_come_twice_without_it(tmp_path):
    """What the extension is for, so that a Sphinx that stops repeating them shows here."""
    page = _page(tmp_path, ["sphinx_thebe", "sphinx_togglebutton"])
    assert _count(page, "const THEBE_JS_URL") == 2
    assert _count(page, "var togglebuttonSelector") == 2


def test_each_inline_script_comes_once_with_it(tmp_path):
    page = _page(tmp_path, ["sphinx_thebe", "sphinx_togglebutton", "unique_scripts"])
    assert _count(page, "const THEBE_JS_URL") == 1
    assert _count(page, "var togglebuttonSelector") == 1
    # the scripts with a source, and their order, are left as they were
    assert _count(page, "sphinx-thebe.js") == 1 and _count(page, "togglebutton.js") == 1
    assert page.index("togglebutton.js") < page.index("var togglebuttonSelector")

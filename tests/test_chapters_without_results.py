"""The results chapters where no committed files are found at all.

The book build executes every chapter against the repository's ``data/results/``, and on Colab
the set-up cell's clone brings them along. A reader whose ``anchor_lib`` came some other way (a
wheel, say) has none of those files, and each cell of chapter 8 or 9 must then say what is
missing, and where such files come from, instead of failing. This runs both chapters with
``ANCHOR_RESULTS_DIR`` pointing at a folder that does not exist.
"""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

BOOK = Path(__file__).resolve().parent.parent / "book"


def _execute(chapter: str, results_dir: Path, monkeypatch) -> list[str]:
    """Run ``chapter`` in a fresh kernel; return its cells' printed text, one string per cell."""
    monkeypatch.setenv("ANCHOR_RESULTS_DIR", str(results_dir))
    monkeypatch.setenv("ANCHOR_PROFILE", "smoke")
    nb = nbformat.read(BOOK / chapter, as_version=4)
    # Raises CellExecutionError, naming the cell, if any cell fails.
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(BOOK)}}).execute()
    return ["".join(o.get("text", "") for o in cell.get("outputs", [])
                    if o.get("output_type") == "stream") for cell in nb.cells]


def test_chapter_8_says_what_is_missing(tmp_path, monkeypatch):
    text = "\n".join(_execute("08_results.ipynb", tmp_path / "nowhere" / "results", monkeypatch))
    assert "No results folder under" in text and "set-up cell" in text
    assert "this book makes no claim about which is more robust" in text
    assert "No ablation results are committed yet" in text
    assert "(no results table: nothing is committed yet)" in text


def test_chapter_9_says_what_is_missing(tmp_path, monkeypatch):
    text = "\n".join(_execute("09_speed.ipynb", tmp_path / "nowhere" / "results", monkeypatch))
    assert "No results folder under" in text and "set-up cell" in text
    assert "No GPU probe" in text and "No precision check is committed" in text

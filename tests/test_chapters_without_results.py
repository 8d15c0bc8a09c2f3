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


def test_chapter_9_reads_a_benchmark_cut_short_or_with_a_failed_stage(tmp_path, monkeypatch):
    """The benchmark writes its JSON after every stage and records a failed stage's error, so a
    GPU slot's file may lack rows or hold {"error": ...}: chapter 9, its exercise solutions
    included, shows what is there instead of failing."""
    import json
    import shutil

    import by_path

    from anchor_lib import checkpoint

    bench_dir = tmp_path / "results" / "bench"
    bench_dir.mkdir(parents=True)
    committed = BOOK.parent / "data" / "results" / "bench" / "NVIDIA_H100_80GB_HBM3.json"
    shutil.copy(committed, bench_dir / committed.name)
    shutil.copy(committed.with_name(committed.name + ".sha256"), bench_dir)
    cut = json.loads(committed.read_text())
    for name in ("standard", "pgd_at", "anchor", "pgd_at_eager"):  # the last stages, cut off
        cut["results"].pop(name)
    cut["results"]["reference_pgd_at"] = {"error": "RuntimeError: DataLoader worker died"}
    cut["when"] = "2099-01-01T00:00:00+00:00"  # the newest file: the chapter's "latest"
    checkpoint.write_json(bench_dir / "NVIDIA_H200.json", cut)

    execute_book = by_path.load("scripts/execute_book.py", "_execute_book")
    nb = nbformat.read(BOOK / "09_speed.ipynb", as_version=4)
    nb.cells += execute_book.solution_cells(nb, "09_speed")
    monkeypatch.setenv("ANCHOR_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("ANCHOR_PROFILE", "smoke")
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(BOOK)}}).execute()
    text = "\n".join("".join(o.get("text", "") for o in cell.get("outputs", [])
                             if o.get("output_type") == "stream") for cell in nb.cells)
    assert "reference_pgd_at failed: RuntimeError: DataLoader worker died" in text
    assert "measured, anchor_compiled / pgd_at_compiled" not in text  # the cut file has neither

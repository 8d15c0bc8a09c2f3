"""How large each figure's text reads on the book's pages.

Every chapter's figures are drawn at some width in inches and shown scaled to the page's text
column, so a label set in 8 points can end up a few pixels tall. This script runs the code cells
of each chapter (as a script: no kernel, the Agg backend, ``book/`` as the working directory, the
profile of ``ANCHOR_PROFILE``), and at every ``plt.show()`` measures each figure: its width as the
inline backend saves it (the tight bounding box at the figure's dpi), the width it is shown at
(at most :data:`COLUMN_PX`), and the height in CSS pixels of its smallest visible text, the font
size scaled by the same factor.

    python scripts/figure_text.py [OUT.json] [--chapters 01 05 ...]

Default output: ``data/results/cpu-checks/figure_text.json``. About as long as the chapters take
one after another at the profile (a few minutes at smoke).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import matplotlib
import nbformat

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "data" / "results" / "cpu-checks" / "figure_text.json"
#: The width in CSS pixels of the text column of a chapter page in a 1280-px window (the width
#: the browser gives a figure's <img> there; tests/test_book.py opens the pages at that size).
COLUMN_PX = 708
#: The book's floor for a figure's text, in CSS pixels as the page shows it: the body text is 16
#: px and code 13 px, and tick labels much below 10 px are hard to read at arm's length.
MIN_TEXT_PX = 9.5


def _cells(path: Path) -> list[tuple[str, str]]:
    """``(cell id, source)`` of each code cell, without IPython's ``%`` and ``!`` lines."""
    nb = nbformat.read(path, as_version=4)
    return [(cell.get("id", ""), "\n".join(line for line in cell.source.splitlines()
                                           if not line.lstrip().startswith(("%", "!"))))
            for cell in nb.cells if cell.cell_type == "code"]


def measure_figure(fig, column_px: float = COLUMN_PX) -> dict:
    """The shown width and smallest text of one matplotlib figure.

    Returns:
        ``{"natural_px": float, "shown_px": float, "scale": float, "smallest_text_px": float |
        None, "smallest_text": str | None}``: widths in pixels (the saved PNG's, the page's),
        the text height in CSS pixels at that scale (font size in points times dpi / 72 times
        the scale), None when the figure has no visible text.
    """
    fig.canvas.draw()   # as saving does: constrained layout places the axes only when drawn
    renderer = fig.canvas.get_renderer()
    # the inline backend saves the tight bounding box plus savefig.pad_inches on each side
    pad = matplotlib.rcParams["savefig.pad_inches"]
    natural = float((fig.get_tightbbox(renderer).width + 2 * pad) * fig.dpi)
    scale = min(1.0, column_px / natural)
    smallest, which = None, None
    for text in fig.findobj(lambda a: hasattr(a, "get_fontsize") and hasattr(a, "get_text")):
        content = text.get_text().strip()
        if not content or not text.get_visible():
            continue
        px = text.get_fontsize() * fig.dpi / 72 * scale
        if smallest is None or px < smallest:
            smallest, which = px, content[:60]
    return {"natural_px": round(natural, 1), "shown_px": round(natural * scale, 1),
            "scale": round(scale, 3), "smallest_text_px": None if smallest is None
            else round(smallest, 1), "smallest_text": which}


def run_chapter(path: Path) -> list[dict]:
    """Execute one chapter's code cells and measure every figure it shows."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found: list[dict] = []
    current = {"cell": ""}

    def show(*args, **kwargs) -> None:
        for number in plt.get_fignums():
            fig = plt.figure(number)
            found.append({"chapter": path.stem, "cell": current["cell"], **measure_figure(fig)})
        plt.close("all")

    plt.show = show
    namespace: dict = {"__name__": "__main__", "display": _display}
    here = os.getcwd()
    os.chdir(path.parent)
    try:
        for cell_id, source in _cells(path):
            current["cell"] = cell_id
            exec(compile(source, f"{path.name}:{cell_id}", "exec"), namespace)
        show()   # a figure left open at the end
    finally:
        os.chdir(here)
        plt.close("all")
    return found


def _display(*objects, **kwargs) -> None:
    """IPython's display, as a no-op: only figures are measured."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", type=Path, default=OUT)
    parser.add_argument("--chapters", nargs="*", help="chapter numbers (default: all)")
    args = parser.parse_args(argv)
    sys.path[:0] = [str(REPO), str(REPO / "scripts")]
    from execute_book import chapters as toc_chapters  # the notebooks _toc.yml lists

    from anchor_lib import checkpoint, provenance
    from anchor_lib.train import default_profile

    chapters = toc_chapters(REPO)
    if args.chapters:
        chapters = [p for p in chapters if p.name[:2] in args.chapters]
    figures, seconds = [], {}
    for path in chapters:
        start = time.perf_counter()
        figures += run_chapter(path)
        seconds[path.stem] = round(time.perf_counter() - start, 1)
        print(f"{path.stem}: {seconds[path.stem]} s", file=sys.stderr, flush=True)
    small = [f for f in figures if f["smallest_text_px"] is not None
             and f["smallest_text_px"] < MIN_TEXT_PX]
    result = {
        "what": "the smallest text of every figure of the book, in CSS pixels as the page shows "
                "it (font size x dpi / 72 x the figure's scale to the text column)",
        "command": "python scripts/figure_text.py",
        "profile": default_profile(),
        "data": "CIFAR-10 (JPEG q75 copy) and the committed results and checkpoints, as the "
                "chapters read them",
        "column_px": COLUMN_PX, "min_text_px": MIN_TEXT_PX,
        **provenance.describe("cpu"),
        "chapter_seconds": seconds,
        "figures": figures,
        "below_min_text_px": len(small),
    }
    checkpoint.write_json(args.out, result)
    for f in figures:
        flag = "SMALL" if f in small else "     "
        print(f"{flag} {f['chapter'][:2]} {f['cell']:>14}: {f['smallest_text_px']} px "
              f"({f['smallest_text']!r}), shown at {f['shown_px']:.0f} of {f['natural_px']:.0f} px")
    print(f"{len(small)} of {len(figures)} figures have text below {MIN_TEXT_PX:g} px; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Write the book's chapters as student handouts: the exercises kept, their solutions removed.

Each chapter ends with exercises, and each exercise's solution follows it as a folded
``{admonition} Solution`` block (a fenced directive with backticks or colons, in a cell of its own
or inside the exercise's cell). This script copies the chapters to ``OUT`` with every such block
removed, so that a teacher can hand them out as assignments. The "Open in Colab" badge goes too:
it opens the book's own copy, solutions included; students open the handout itself instead
(in Colab: File > Upload notebook). Everything else, the set-up cell included, is unchanged.

Usage, from the repository root::

    python scripts/handout.py OUT [CHAPTER ...]

``CHAPTER`` is a chapter's number or file name (``3``, ``03_supervised_contrastive``); the
default is every chapter of ``book/``. The sources in ``book/`` are never written to.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import nbformat

BOOK = Path(__file__).resolve().parent.parent / "book"
# The opening line of a solution: a MyST directive fenced by three or more backticks or colons.
OPENING = re.compile(r"^(`{3,}|:{3,})\{admonition\}\s+Solution\s*$")
BADGE = re.compile(r"^\[!\[Open in Colab\]\([^)]*\)\]\([^)]*\)\s*$")
EXERCISE = re.compile(r"^\*\*\d+\.")


def _tidy(text: str) -> str:
    """At most one blank line in a row, where removed lines left more."""
    return re.sub(r"\n{3,}", "\n\n", text)


class HandoutError(ValueError):
    """A chapter whose solutions cannot be removed safely (an unclosed block, say)."""


def _split(text: str, where: str) -> tuple[list[str], list[list[str]], str]:
    """The lines of ``text`` outside solution blocks, the lines inside each block (its fences
    left out), and the order of exercise prompts and solutions (see :func:`strip_solutions`)."""
    kept: list[str] = []
    bodies: list[list[str]] = []
    order, fence, opened_at = "", None, 0
    for number, line in enumerate(text.split("\n"), start=1):
        if fence is None:
            match = OPENING.match(line.strip())
            if match:
                fence, opened_at, order = match.group(1), number, order + "S"
                bodies.append([])
            else:
                kept.append(line)
                order += "E" if EXERCISE.match(line) else ""
        elif line.strip() == fence:
            fence = None
        else:
            bodies[-1].append(line)
    if fence is not None:
        raise HandoutError(f"{where}: the solution opened on line {opened_at} with {fence!r} "
                           f"is never closed (expected a line {fence!r})")
    return kept, bodies, order


def strip_solutions(text: str, where: str = "") -> tuple[str, int, str]:
    """``text`` (one markdown cell) without its solution blocks, how many it had, and the order
    in which its exercise prompts (``E``) and solutions (``S``) stand, e.g. ``"ESES"``.

    A block runs from its opening line to the first line that is exactly its fence (the same
    characters, as many); fences of other kinds inside it (a ``~~~`` or `````` ``` `````` code
    block in a ``:::`` solution) do not close it, and a prompt inside it does not count. An
    unclosed block is an error, not a cell cut short."""
    kept, bodies, order = _split(text, where)
    if not bodies:
        return text, 0, order
    return _tidy("\n".join(kept)).strip("\n"), len(bodies), order


# A fenced Python code block inside a solution (``~~~python`` or `````` ```python ``````).
PYTHON_BLOCK = re.compile(r"^(`{3,}|~{3,})python[ \t]*\n(.*?)\n\1[ \t]*$", re.S | re.M)


def solution_code(text: str, where: str = "") -> list[str]:
    """The Python code of the solutions in ``text`` (one markdown cell): each fenced ``python``
    block inside a solution block, in order (what ``execute_book.py`` runs after the chapter)."""
    _, bodies, _ = _split(text, where)
    return [match.group(2) for body in bodies
            for match in PYTHON_BLOCK.finditer("\n".join(body))]


def handout(nb: nbformat.NotebookNode, name: str = "") -> tuple[nbformat.NotebookNode, int, int]:
    """A copy of ``nb`` without solution blocks and without its Colab badge; also the numbers of
    exercises (``**1.**``-style prompts) and of solutions removed. Every exercise must be
    followed by exactly one solution before the next exercise (:class:`HandoutError` if not):
    a handout with one exercise's solution left in, or with a stray solution removed, is worse
    than none."""
    out = nbformat.from_dict(nb)
    cells, order = [], ""
    for index, cell in enumerate(out.cells):
        if cell.cell_type == "markdown":
            lines = cell.source.split("\n")
            text = "\n".join(line for line in lines if not BADGE.match(line.strip()))
            if text != cell.source:   # the badge's line went, and the blank line after it
                text = _tidy(text).lstrip("\n")
            text, _, cell_order = strip_solutions(text, f"{name}, cell {index}")
            order += cell_order
            if not text.strip() and cell.source.strip():
                continue   # the cell held nothing but a solution
            cell.source = text
        cells.append(cell)
    out.cells = cells
    exercises, solutions = order.count("E"), order.count("S")
    if order != "ES" * exercises:
        raise HandoutError(f"{name}: expected each exercise followed by exactly one solution; "
                           f"found {exercises} exercises and {solutions} solutions in the order "
                           f"{order or '(none)'} (E: an exercise, S: a solution)")
    return out, exercises, solutions


def chapter_paths(book: Path, wanted: list[str]) -> list[Path]:
    """The chapters named by number or file name (all of them for none), in book order."""
    chapters = sorted(book.glob("[0-9][0-9]_*.ipynb"))
    if not wanted:
        return chapters
    chosen = []
    for want in wanted:
        match = [p for p in chapters
                 if p.stem == want or (want.isdigit() and int(p.stem[:2]) == int(want))]
        if not match:
            raise HandoutError(f"no chapter {want!r}; expected a number or one of: "
                               + ", ".join(p.stem for p in chapters))
        chosen += [p for p in match if p not in chosen]
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for the handouts (created)")
    parser.add_argument("chapters", nargs="*",
                        help="chapter numbers or file names (default: all)")
    parser.add_argument("--book", type=Path, default=BOOK, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    book = args.book.resolve()
    if args.out.resolve() == book:
        parser.error(f"OUT must not be the book's own folder ({book}): the handouts would "
                     "overwrite the chapters")
    try:
        paths = chapter_paths(book, args.chapters)
        done = []
        for path in paths:
            nb, exercises, _ = handout(nbformat.read(path, as_version=4), path.name)
            done.append((path, nb, exercises))
    except HandoutError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for path, nb, exercises in done:
        nbformat.write(nb, args.out / path.name)
        print(f"{args.out / path.name}: {exercises} exercises, solutions removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""scripts/handout.py: the chapters as student handouts, exercises kept and solutions removed."""

from __future__ import annotations

import re
from pathlib import Path

import by_path
import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = sorted((ROOT / "book").glob("[0-9][0-9]_*.ipynb"))


handout = by_path.load("scripts/handout.py")
# A solution block, found here independently of the script: its fence, then its body.
SOLUTION = re.compile(r"^(`{3,}|:{3,})\{admonition\} Solution\n(.*?)^\1$", re.M | re.S)


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_a_handout_keeps_every_exercise_and_nothing_of_the_solutions(path):
    source = nbformat.read(path, as_version=4)
    out, exercises, solutions = handout.handout(source, path.name)
    text = "\n".join(c.source for c in out.cells)
    # Every chapter ends with exercises, each with one solution, all of them gone.
    assert exercises >= 1 and solutions == exercises
    assert "{admonition} Solution" not in text and "Open in Colab" not in text
    # Found independently of the script: no line of any solution's body is left.
    source_text = "\n".join(c.source for c in source.cells if c.cell_type == "markdown")
    bodies = [m.group(2) for m in SOLUTION.finditer(source_text)]
    assert len(bodies) == solutions
    # (A line a solution shares with the chapter's other markdown may stay.)
    outside = set(SOLUTION.sub("", source_text).splitlines())
    handout_lines = set("\n".join(c.source for c in out.cells if c.cell_type == "markdown")
                        .splitlines())
    leftovers = [line for body in bodies for line in body.splitlines()
                 if line.strip() and line in handout_lines and line not in outside]
    assert leftovers == []
    prompts = re.findall(r"^\*\*\d+\..*$", "\n".join(c.source for c in source.cells), re.M)
    assert prompts and prompts == re.findall(r"^\*\*\d+\..*$", text, re.M)
    # The code cells, the set-up cell among them, are the chapter's, in order; so are the
    # markdown cells that held neither a solution nor the badge.
    assert [c.source for c in out.cells if c.cell_type == "code"] == [
        c.source for c in source.cells if c.cell_type == "code"]
    untouched = [c.source for c in source.cells if c.cell_type == "markdown"
                 and "{admonition} Solution" not in c.source and "Open in Colab" not in c.source]
    assert all(s in [c.source for c in out.cells] for s in untouched)
    assert out.cells[0].source.startswith("# ")   # the title, now without the badge under it
    nbformat.validate(out)
    assert "{admonition} Solution" in "\n".join(c.source for c in source.cells)  # not mutated


def test_both_fence_styles_and_the_code_inside_them():
    text = ("**1.** Ask.\n\n:::{admonition} Solution\n:class: dropdown\n\n```python\nx = 1\n```\n"
            ":::\n\n**2.** Ask again.\n\n````{admonition} Solution\n:class: dropdown\n```python\n"
            "y = 2\n```\n````\nAfter.")
    out, removed, order = handout.strip_solutions(text)
    assert removed == 2 and order == "ESES"
    assert out == "**1.** Ask.\n\n**2.** Ask again.\n\nAfter."
    # Another admonition, or a cell without solutions, stays exactly as it was.
    note = "```{admonition} Note\nKeep me.\n```\n\n\n"
    assert handout.strip_solutions(note) == (note, 0, "")


@pytest.mark.bad_input(cases=5)
def test_bad_input_is_refused_with_what_was_expected(tmp_path, capsys):
    with pytest.raises(handout.HandoutError, match=r"line 3 with ':::' is never closed"):
        handout.strip_solutions("**1.** Ask.\n\n:::{admonition} Solution\nno end", "ch, cell 4")

    book = tmp_path / "book"
    book.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# One"),
                nbformat.v4.new_markdown_cell("**1.** Ask.\n\n**2.** Ask again.\n\n"
                                              "```{admonition} Solution\nOne.\n```")]
    nbformat.write(nb, book / "01_one.ipynb")
    assert handout.main([str(tmp_path / "out"), "--book", str(book)]) == 2
    assert ("01_one.ipynb: expected each exercise followed by exactly one solution; found 2 "
            "exercises and 1 solutions in the order EES") in capsys.readouterr().err
    assert not (tmp_path / "out").exists()   # nothing is written when a chapter is refused

    # As many solutions as exercises, but two after the first and none after the second.
    nb.cells[1].source = ("**1.** Ask.\n\n```{admonition} Solution\nOne.\n```\n\n"
                          "```{admonition} Solution\nOne more.\n```\n\n**2.** Ask again.")
    with pytest.raises(handout.HandoutError, match="in the order ESSE"):
        handout.handout(nb, "01_one.ipynb")

    assert handout.main([str(tmp_path / "out"), "7", "--book", str(book)]) == 2
    assert "no chapter '7'; expected a number or one of: 01_one" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exc:
        handout.main([str(book), "--book", str(book)])
    assert exc.value.code == 2 and "must not be the book's own folder" in capsys.readouterr().err


def test_the_command_writes_the_chosen_chapters(tmp_path, capsys):
    assert handout.main([str(tmp_path / "out"), "3", "01_adversarial_examples"]) == 0
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["01_adversarial_examples.ipynb", "03_supervised_contrastive.ipynb"]
    nb = nbformat.read(tmp_path / "out" / "03_supervised_contrastive.ipynb", as_version=4)
    assert "{admonition} Solution" not in "\n".join(c.source for c in nb.cells)
    assert "solutions removed" in capsys.readouterr().out


def test_the_badge_line_goes_with_its_blank_line_and_other_cells_keep_their_spacing():
    badge = ("[![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
             "(https://colab.research.google.com/github/anchor-book/anchor-book/blob/main/book/x.ipynb)")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(f"# Title\n\n{badge}\n\nThe chapter."),
                nbformat.v4.new_markdown_cell("\n\nA cell that starts blank.\n\n\n\nKept as written."),
                nbformat.v4.new_markdown_cell("**1.** An exercise.\n\n:::{admonition} Solution\n"
                                              ":class: dropdown\nThe answer.\n:::")]
    out, exercises, solutions = handout.handout(nb, "x.ipynb")
    assert (exercises, solutions) == (1, 1)
    assert out.cells[0].source == "# Title\n\nThe chapter."
    assert out.cells[1].source == nb.cells[1].source  # no badge, no solution: untouched
    assert out.cells[2].source == "**1.** An exercise."


def test_the_command_writes_into_new_nested_and_existing_folders(tmp_path):
    out = tmp_path / "term" / "week 3"
    assert handout.main([str(out), "3"]) == 0
    assert handout.main([str(out), "1"]) == 0  # the folder exists now: written beside
    assert sorted(p.name for p in out.iterdir()) == ["01_adversarial_examples.ipynb",
                                                     "03_supervised_contrastive.ipynb"]

"""Static checks of the book's sources: fast, no execution, no build (they run with the unit tests).

Every chapter notebook listed in ``_toc.yml`` must

- be a valid notebook, committed without outputs (``outputs: []``, ``execution_count: null``),
  with a Python 3 kernelspec;
- open with a markdown title cell carrying the "Open in Colab" badge for its own path;
- have, as its first code cell, the set-up cell that clones the book's repository and installs
  ``anchor_lib`` from it only when the import fails (valid Python: the pip call goes through
  ``get_ipython().run_line_magic``; ``test_setup_cell.py`` runs it);
- have a profile cell (``anchor_lib.train.default_profile()``, printed) among its first code cells;
- end with exercises whose solutions are folded away (a ``dropdown`` admonition or ``{toggle}``);
- cite only keys that exist in ``book/references.bib``.

``test_book.py`` runs the same checks again in the book stage (``pytest -m book``).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BOOK = ROOT / "book"
COLAB_PREFIX = "https://colab.research.google.com/github/anchor-book/anchor-book/blob/main/"
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
REPO_URL = "https://github.com/anchor-book/anchor-book"


def toc() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))


def toc_files() -> list[str]:
    """Every page of the book, as written in _toc.yml (root first), e.g. ``book/05_anchor``."""
    data = toc()
    files = [data["root"]]
    for part in data.get("parts", []):
        for chapter in part.get("chapters", []):
            files.append(chapter["file"])
            files += [section["file"] for section in chapter.get("sections", [])]
    return files


def chapter_files() -> list[str]:
    """The pages of the "Chapters" part (the notebooks)."""
    for part in toc().get("parts", []):
        if part.get("caption") == "Chapters":
            return [chapter["file"] for chapter in part["chapters"]]
    raise AssertionError("_toc.yml has no part with caption 'Chapters'")


def source_of(page: str) -> Path:
    for suffix in (".ipynb", ".md"):
        path = ROOT / f"{page}{suffix}"
        if path.exists():
            return path
    raise AssertionError(f"{page} is listed in _toc.yml but neither {page}.ipynb nor {page}.md "
                         "exists")


def bib_keys() -> set[str]:
    text = (BOOK / "references.bib").read_text(encoding="utf-8")
    return set(re.findall(r"^@\w+\s*\{\s*([^,\s]+)\s*,", text, flags=re.M))


def load_notebook(page: str):
    import nbformat

    path = ROOT / f"{page}.ipynb"
    assert path.exists(), f"chapter {page} must be a notebook ({path.name} is missing)"
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    return nb


def _code_cells(nb) -> list:
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def _python_source(source: str) -> str:
    """Cell source with IPython-only lines (magics, shell escapes) blanked out."""
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line
                     for line in source.splitlines())


# --- the checks (shared with test_book.py) --------------------------------------------------------

def check_no_outputs(page: str) -> None:
    nb = load_notebook(page)
    dirty = [i for i, cell in enumerate(nb.cells)
             if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count"))]
    assert not dirty, (f"{page}.ipynb is committed with outputs in cells {dirty}; clear them "
                       "(jupyter nbconvert --clear-output --inplace)")
    kernel = nb.metadata.get("kernelspec", {})
    assert kernel.get("language", "python") == "python" and kernel.get("name") == "python3", \
        f"{page}.ipynb must use the python3 kernel, has kernelspec {kernel!r}"


def check_colab_badge(page: str) -> None:
    nb = load_notebook(page)
    first = nb.cells[0]
    assert first.cell_type == "markdown", f"{page}.ipynb must open with a markdown title cell"
    assert re.match(r"\s*# \S", first.source), f"{page}.ipynb's first cell must start with '# Title'"
    link = f"{COLAB_PREFIX}{page}.ipynb"
    assert link in first.source, f"{page}.ipynb's first cell lacks the Colab link {link}"
    assert BADGE_IMAGE in first.source, f"{page}.ipynb's first cell lacks the badge {BADGE_IMAGE}"


def check_setup_and_profile_cells(page: str) -> None:
    nb = load_notebook(page)
    code = _code_cells(nb)
    assert code, f"{page}.ipynb has no code cells"
    setup = code[0].source
    tree = ast.parse(setup)  # the set-up cell must be plain Python (it runs outside IPython too)
    handlers = [node for node in ast.walk(tree) if isinstance(node, ast.Try)]
    assert handlers and "import anchor_lib" in setup and "ImportError" in setup, \
        f"{page}.ipynb: the first code cell must be `try: import anchor_lib / except ImportError:`"
    assert "run_line_magic" in setup and "pip" in setup and REPO_URL in setup, \
        (f"{page}.ipynb: the set-up cell must clone {REPO_URL} and install anchor_lib from the "
         "clone with get_ipython().run_line_magic('pip', ...)")
    profile_cells = [cell for cell in code[:4] if "default_profile()" in cell.source]
    assert profile_cells, (f"{page}.ipynb: one of the first code cells must read the profile with "
                           "anchor_lib.train.default_profile()")
    assert "print(" in profile_cells[0].source, f"{page}.ipynb: the profile cell must print it"
    for i, cell in enumerate(code):
        try:
            ast.parse(_python_source(cell.source))
        except SyntaxError as err:
            raise AssertionError(f"{page}.ipynb: code cell {i} is not valid Python: {err}") from err


def check_exercises(page: str) -> None:
    nb = load_notebook(page)
    text = "\n".join(cell.source for cell in nb.cells if cell.cell_type == "markdown")
    assert re.search(r"exercise", text, flags=re.I), f"{page}.ipynb has no exercises"
    assert ":class: dropdown" in text or "{toggle}" in text, \
        f"{page}.ipynb: exercise solutions must be folded away (dropdown admonition or toggle)"


def check_citations(page: str) -> None:
    path = source_of(page)
    if path.suffix == ".ipynb":
        nb = load_notebook(page)
        text = "\n".join(cell.source for cell in nb.cells if cell.cell_type == "markdown")
    else:
        text = path.read_text(encoding="utf-8")
    cited = {key.strip() for group in re.findall(r"\{cite(?::\w+)?\}`([^`]*)`", text)
             for key in group.split(",")}
    unknown = sorted(cited - bib_keys())
    assert not unknown, f"{path.name} cites keys missing from book/references.bib: {unknown}"


# --- tests ---------------------------------------------------------------------------------------

def test_toc_pages_exist():
    for page in toc_files():
        source_of(page)


def test_bibliography_has_the_shared_keys():
    required = {"goodfellow2015fgsm", "madry2018pgd", "carlini2017cw", "croce2020autoattack",
                "khosla2020supcon", "robinson2021hard", "rice2020overfitting", "wong2020fast",
                "zhang2019trades", "athalye2018obfuscated", "carlini2019evaluating",
                "mcinnes2018umap", "anchor2025", "he2016preact", "croce2021robustbench",
                "krizhevsky2009cifar"}
    assert not required - bib_keys(), f"missing: {sorted(required - bib_keys())}"


@pytest.mark.parametrize("page", chapter_files())
def test_notebook_committed_without_outputs(page):
    check_no_outputs(page)


@pytest.mark.parametrize("page", chapter_files())
def test_notebook_has_colab_badge(page):
    check_colab_badge(page)


@pytest.mark.parametrize("page", chapter_files())
def test_notebook_has_setup_and_profile_cells(page):
    check_setup_and_profile_cells(page)


@pytest.mark.parametrize("page", chapter_files())
def test_notebook_ends_with_exercises(page):
    check_exercises(page)


def code_columns() -> int:
    """The columns of code that the rendered book shows without scrolling (book/ruff.toml's
    line-length, which _static/code.css's font size is chosen for)."""
    import tomllib

    return tomllib.loads((BOOK / "ruff.toml").read_text(encoding="utf-8"))["line-length"]


def solution_blocks(nb) -> list[tuple[int, str]]:
    """(markdown cell index, python code) of every exercise solution in ``nb``, as
    scripts/handout.py (and so the book build) finds them."""
    import by_path

    handout = by_path.load("scripts/handout.py", "_handout")
    return [(i, code) for i, cell in enumerate(nb.cells) if cell.cell_type == "markdown"
            for code in handout.solution_code(cell.source)]


@pytest.mark.parametrize("page", chapter_files())
def test_code_fits_the_rendered_column(page):
    """Every line of a code cell and of an exercise solution fits the book's code column at a
    1280-px window: a line that scrolls sideways hides its end from the reader (ruff's E501
    checks the code cells too, with exceptions such as a line that ends in a URL; this does not)."""
    nb, limit = load_notebook(page), code_columns()
    sources = [(f"code cell {i}", cell.source) for i, cell in enumerate(nb.cells)
               if cell.cell_type == "code"]
    sources += [(f"a solution in markdown cell {i}", code) for i, code in solution_blocks(nb)]
    long = [f"{where}: {len(line)} columns: {line.strip()[:50]}..." for where, source in sources
            for line in source.splitlines() if len(line) > limit]
    assert not long, f"{page}.ipynb: lines over {limit} columns:\n" + "\n".join(long)


@pytest.mark.parametrize("page", toc_files())
def test_citations_resolve(page):
    check_citations(page)


def display_math_glued_to_text(text: str) -> list[str]:
    """The lines of ``text`` that open a ``$$`` display block right below a line of text: MyST
    then reads the block as inline math of that paragraph, and the page shows raw LaTeX."""
    glued, inside, previous = [], False, ""
    for line in text.split("\n"):
        if line.strip() == "$$":
            if not inside and previous.strip():
                glued.append(previous.strip())
            inside = not inside
        previous = line
    return glued


@pytest.mark.parametrize("page", toc_files())
def test_display_math_stands_in_a_paragraph_of_its_own(page):
    path = source_of(page)
    if path.suffix == ".ipynb":
        cells = [c.source for c in load_notebook(page).cells if c.cell_type == "markdown"]
    else:
        cells = [path.read_text(encoding="utf-8")]
    glued = [line for text in cells for line in display_math_glued_to_text(text)]
    assert not glued, f"{path.name}: a $$ block directly below a line of text (add a blank line): {glued}"


def test_glued_display_math_is_found():
    assert display_math_glued_to_text("4. **The loss**\n   $$\n   x\n   $$\n") == ["4. **The loss**"]
    assert display_math_glued_to_text("Text.\n\n$$\nx\n$$\nmore") == []


@pytest.mark.parametrize("page", toc_files())
def test_pages_send_readers_only_where_they_can_go(page):
    """The design document lives beside the repository, not in it: a reader of the website or of
    a Colab copy cannot open it, so a page names the chapter, the README or the file instead."""
    path = source_of(page)
    text = path.read_text(encoding="utf-8")
    assert not re.search(r"\bDESIGN\b", text), \
        f"{path.name} refers the reader to DESIGN.md, which is not part of the book or the repository"


def test_api_page_docstrings_send_readers_only_where_they_can_go():
    """The API page renders the library's docstrings: they must not point at DESIGN.md either."""
    import importlib
    import inspect

    api = (BOOK / "api.md").read_text(encoding="utf-8")
    modules = re.findall(r"automodule:: (anchor_lib\.\w+)", api)
    assert modules, "api.md renders no module"
    found = []
    for name in modules:
        module = importlib.import_module(name)
        members = [module, *(getattr(module, n) for n in getattr(module, "__all__", ()))]
        members += [m for obj in members if inspect.isclass(obj)
                    for m in vars(obj).values() if inspect.isfunction(m)]
        found += [f"{name}: {getattr(m, '__name__', m)}" for m in members
                  if re.search(r"\bDESIGN\b", inspect.getdoc(m) or "")]
    assert not found, f"docstrings the API page shows refer to DESIGN.md: {found}"


def test_index_describes_the_profiles_the_code_defines():
    """The landing page's profile table quotes each profile's default training run; it must be
    ``TrainConfig.from_profile``'s (a reader sizes a Colab session by it)."""
    from test_notation import rows

    from anchor_lib.train import TrainConfig

    row = {r["Profile"].strip("`"): r["What the training cells do"]
           for r in rows((BOOK / "index.md").read_text(encoding="utf-8")) if "Profile" in r}
    smoke, demo, full = (TrainConfig.from_profile(p) for p in ("smoke", "demo", "full"))
    assert (f"width-{smoke.width} ResNet, {smoke.train_subset:,} training images, "
            f"{smoke.epochs} epoch{'s' * (smoke.epochs != 1)}, PGD-{smoke.attack_steps}") in row["smoke"]
    assert (f"width-{demo.width} ResNet, {demo.train_subset:,} images, {demo.epochs} epochs"
            in row["demo"])
    assert full.width == 64 and "full-width ResNet-18" in row["full"]  # PreAct ResNet-18's width
    assert full.train_subset is None
    assert f"{full.epochs} epochs, PGD-{full.attack_steps}," in row["full"]


def test_index_settings_table_is_each_profiles_config():
    """The landing page's settings table: every cell is ``TrainConfig.from_profile``'s value, and
    every profile a reader can choose (and ``tutorial``) has a column."""
    from test_notation import rows

    from anchor_lib.train import PROFILES, TrainConfig

    table = {r["Setting"]: r for r in rows((BOOK / "index.md").read_text(encoding="utf-8"))
             if "Setting" in r}
    cifar10_train = 50_000
    for profile in PROFILES:
        cfg, column = TrainConfig.from_profile(profile), f"`{profile}`"
        train_images = cfg.train_subset or cifar10_train - cfg.val_size
        expected = {
            "ResNet width": f"{cfg.width}",
            "Training images": f"{train_images:,}",
            "Validation images": f"{cfg.val_size:,}",
            "Epochs": f"{cfg.epochs}",
            "Batch size": f"{cfg.batch_size}",
            "Peak learning rate": f"{cfg.lr:g}",
            "Training attack": f"PGD-{cfg.attack_steps}",
            "Validation attack": f"PGD-{cfg.val_attack_steps}",
        }
        assert {k: table[k][column] for k in expected} == expected, profile

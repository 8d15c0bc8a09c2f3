"""The chapters' set-up cell, run where ``anchor_lib`` is missing, as on Colab.

Every chapter opens with the same cell; ``book/colab.md`` quotes it. Where the import fails, the
cell clones the book's repository into ``./anchor-book``, installs the library from the clone
(``%pip install -e``) and imports it from there, so that the committed results and tutorial
checkpoints in the clone are found without further steps.

The tests run the cell in a fresh interpreter with the development install of ``anchor_lib``
hidden, cloning from a bare copy of this repository instead of GitHub. The ``%pip`` line magic is
recorded, not run: installing into the test environment would replace its ``anchor_lib``.
(``scripts/colab_check.py`` runs chapters with the real install in a separate environment.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import by_path
import pytest

static = by_path.load("tests/test_notebooks_static.py", "_nb_static")
REPO_URL, chapter_files, load_notebook = static.REPO_URL, static.chapter_files, static.load_notebook

ROOT = Path(__file__).resolve().parent.parent

# Runs in a fresh interpreter: hide the development install, check that it is hidden, give the
# cell a get_ipython() that records line magics, run the cell, and report what it did as JSON.
RUNNER = r"""
import json, sys
sys.meta_path = [f for f in sys.meta_path
                 if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path = [p for p in sys.path if p not in (ROOT, ROOT + "/")]
try:
    import anchor_lib
    raise SystemExit(f"anchor_lib is still importable from {anchor_lib.__file__}: the test "
                     "cannot hide the development install")
except ImportError:
    pass

magics = []


class Shell:
    def run_line_magic(self, name, line):
        magics.append([name, line])


def get_ipython():
    return Shell()


exec(compile(CELL, "<set-up cell>", "exec"), {"get_ipython": get_ipython})
exec(compile(CELL, "<set-up cell, run again>", "exec"), {"get_ipython": get_ipython})
import anchor_lib
from anchor_lib import results

loaded = results.load_tutorial_checkpoint("standard")
print(json.dumps({"file": anchor_lib.__file__, "results": str(results.default_root()),
                  "magics": magics, "checkpoint": None if loaded is None else loaded[2]["file"],
                  "runs": [r.name for r in results.load_results()]}))
"""


def setup_cell() -> str:
    return next(c for c in load_notebook(chapter_files()[0]).cells if c.cell_type == "code").source


def start_cell(cwd: Path, url: str) -> subprocess.CompletedProcess:
    """Run the set-up cell, cloning from ``url``, in a new interpreter in ``cwd``."""
    cell = setup_cell().replace(REPO_URL, url)
    code = f"ROOT = {str(ROOT)!r}\nCELL = {cell!r}\n{RUNNER}"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd), "GIT_CONFIG_NOSYSTEM": "1"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def run_cell(cwd: Path, url: str) -> dict:
    """:func:`start_cell`, which must succeed; what the runner reported."""
    done = start_cell(cwd, url)
    assert done.returncode == 0, f"the set-up cell failed:\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def remote(tmp_path_factory) -> Path:
    """A bare clone of this repository's HEAD: GitHub's stand-in."""
    path = tmp_path_factory.mktemp("remote") / "anchor-book.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(ROOT), str(path)], check=True)
    return path


def test_every_chapter_opens_with_the_cell_that_colab_md_quotes():
    cell = setup_cell()
    for page in chapter_files():
        first = next(c for c in load_notebook(page).cells if c.cell_type == "code")
        assert first.source == cell, f"{page}.ipynb's set-up cell differs from chapter 1's"
        # folded on the website (the reader sees its output); Colab ignores the tag
        assert first.metadata.get("tags") == ["hide-input"], \
            f"{page}.ipynb's set-up cell must carry the tag hide-input, has {first.metadata}"
    colab = (ROOT / "book" / "colab.md").read_text(encoding="utf-8")
    assert f"```python\n{cell}\n```" in colab, "book/colab.md must quote the set-up cell as it is"


def test_where_anchor_lib_is_missing_the_cell_clones_installs_and_finds_the_results(tmp_path,
                                                                                    remote):
    done = run_cell(tmp_path, remote.as_uri())
    clone = tmp_path / "anchor-book"
    assert (clone / ".git").is_dir() and (clone / "pyproject.toml").is_file()
    # imported from the clone, whose committed results and checkpoints the library then finds
    assert Path(done["file"]) == clone / "anchor_lib" / "__init__.py"
    assert Path(done["results"]) == clone / "data" / "results"
    assert done["checkpoint"] == "standard-w16.pt"
    assert "tutorial-pgd_at" in done["runs"]
    # one editable install from the clone, with the chapters' extra; the second run of the cell
    # found the library and did nothing
    assert done["magics"] == [["pip", f'install -q -e "{clone}[notebooks]"']]


def test_a_clone_that_is_already_there_is_not_fetched_again(tmp_path, remote):
    run_cell(tmp_path, remote.as_uri())
    head = (tmp_path / "anchor-book" / ".git" / "HEAD").read_text()
    # a new kernel on the same machine, e.g. after "Restart session" without the install: a
    # second clone would fail, since the URL no longer exists
    done = run_cell(tmp_path, (tmp_path / "gone.git").as_uri())
    assert (tmp_path / "anchor-book" / ".git" / "HEAD").read_text() == head
    assert Path(done["file"]) == tmp_path / "anchor-book" / "anchor_lib" / "__init__.py"


def test_a_failed_clone_stops_the_cell_with_gits_error(tmp_path):
    done = start_cell(tmp_path, (tmp_path / "missing.git").as_uri())
    assert done.returncode != 0
    assert "CalledProcessError" in done.stderr and "git" in done.stderr
    assert not (tmp_path / "anchor-book").exists()

"""scripts/mutate.py: sites, mutants, and a whole run on a tiny repository."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "mutate.py"
sys.path.insert(0, str(SCRIPT.parent))
import mutate  # noqa: E402

MODULE = '''"""A docstring: never mutated (neither is 1 + 1 here)."""


def add(a, b):
    return a + b


def small(x: int = 3) -> bool:
    if x < 0:
        raise ValueError(f"x must be >= {0}")
    return x < 3
'''


def test_sites_and_mutants():
    tree = ast.parse(MODULE)
    found = {(change, line) for _, change, line in mutate.sites(tree)}
    # Nothing in the docstring (line 1) or the raise statement (line 10).
    assert found == {("Add->Sub", 5), ("const 3->4", 8), ("Lt->LtE", 9), ("const 0->1", 9),
                     ("Lt->LtE", 11), ("const 3->4", 11)}
    for index, change, _ in mutate.sites(tree):
        mutated = ast.unparse(mutate.mutate(tree, index))
        assert mutated != ast.unparse(tree), change
        assert ast.unparse(tree) == ast.unparse(ast.parse(MODULE)), "the original is untouched"
    drop = ast.parse("y = -x")
    (index, change, _), = [s for s in mutate.sites(drop) if s[1] == "drop USub"]
    assert ast.unparse(mutate.mutate(drop, index)) == "y = x"


SMALL = "def add(a, b):\n    return a + b\n\n\ndef small(x):\n    return x < 3\n"


@pytest.fixture
def tiny_repo(tmp_path):
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "tests").mkdir()
    (repo / "pkg" / "m.py").write_text(SMALL)
    # add is tested; small is not at its boundary, so x < 3 against x <= 3 goes unnoticed.
    (repo / "tests" / "test_m.py").write_text(
        "from pkg.m import add, small\n\n\ndef test_m():\n"
        "    assert add(2, 3) == 5 and small(0) and not small(10)\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "tiny"], check=True)
    return repo


def test_a_run_kills_what_the_tests_see_and_resumes(tiny_repo, tmp_path):
    out = tmp_path / "out.json"
    cmd = [sys.executable, str(SCRIPT), "pkg/m.py", "--repo", str(tiny_repo), "--tests",
           "tests/test_m.py", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    by_change = {key.split(":", 2)[2] + "@" + key.split(":")[0]: v for key, v in results.items()}
    assert by_change == {"Add->Sub@2": "killed", "Lt->LtE@6": "SURVIVED",
                         "const 3->4@6": "SURVIVED"}
    assert (tiny_repo / "pkg" / "m.py").read_text() == SMALL, "the repository is never touched"
    # A second run over line 2 only finds its one site done already; --recheck runs the
    # survivors only.
    again = subprocess.run([*cmd, "--lines", "1-3"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "; 1 sites" in again.stdout
    assert "killed " not in again.stdout, "nothing run again"
    recheck = subprocess.run([*cmd, "--recheck"], capture_output=True, text=True, timeout=120)
    assert "Lt->LtE" in recheck.stdout and "Add->Sub" not in recheck.stdout


def test_a_baseline_that_fails_is_refused(tiny_repo, tmp_path):
    (tiny_repo / "tests" / "test_m.py").write_text("def test_m():\n    assert False\n")
    subprocess.run(["git", "-C", str(tiny_repo), "-c", "user.name=t", "-c", "user.email=t@t",
                    "commit", "-qam", "broken"], check=True)
    done = subprocess.run([sys.executable, str(SCRIPT), "pkg/m.py", "--repo", str(tiny_repo),
                           "--tests", "tests/test_m.py", "--out", str(tmp_path / "o.json")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "do not pass on the unmutated module" in done.stderr

"""Run chapters as a new Colab machine would: ``anchor_lib`` missing, the set-up cell installing it.

Each chapter runs in ``VENV``, a Python environment holding what Colab has before the set-up cell
(PyTorch, torchvision, a Jupyter kernel) but not ``anchor_lib``. Before each chapter the script
uninstalls ``anchor_lib`` from ``VENV`` and starts from an empty working folder, as on a new Colab
machine; the set-up cell then clones this repository's HEAD (a bare copy stands in for GitHub),
really runs ``%pip install -e`` (the chapters' extra comes from the package index) and imports
the library from the clone. ``tests/test_setup_cell.py`` checks the same cell without ``pip``, on
every test run; this script is the slower, complete check.

Usage, from the repository root::

    python3 -m venv /tmp/colab-venv
    /tmp/colab-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 ipykernel nbclient
    python scripts/colab_check.py /tmp/colab-venv data/results/cpu-checks/colab_check.json [CHAPTER ...]

``CHAPTER`` is a chapter's number (default: all nine). The profile is ``$ANCHOR_PROFILE`` (default
``smoke``). Without network access to CIFAR-10's host, set ``ANCHOR_DATA_DIR`` to a copy (what
Colab's Google Drive mount does; ``book/colab.md``, section 5); ``ANCHOR_RESULTS_DIR`` and
``ANCHOR_CACHE_DIR`` are cleared, since a Colab machine has neither.

Writes ``OUT`` (JSON): per chapter, whether it ran, its seconds, the set-up cell's output, and
every line a chapter printed that says something was not found (``anchor_lib.results.not_found``).
Exit status 1 when a chapter failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from anchor_lib import checkpoint, provenance

ROOT = Path(__file__).resolve().parent.parent
REPO_URL = "https://github.com/anchor-book/anchor-book"
PACKAGES = ("anchor_lib", "torch", "torchvision", "torchattacks", "umap-learn", "ipywidgets",
            "matplotlib", "ipykernel", "nbclient")

# Runs in VENV: execute one chapter with nbclient, its set-up cell pointed at the stand-in.
RUNNER = r"""
import json, sys, nbformat
from nbclient import NotebookClient
chapter, url, cwd, out = sys.argv[1:5]
nb = nbformat.read(chapter, as_version=4)
setup = next(c for c in nb.cells if c.cell_type == "code")
assert REPO_URL in setup.source, "the set-up cell no longer names " + REPO_URL
setup.source = setup.source.replace(REPO_URL, url)
error = None
try:
    NotebookClient(nb, timeout=1800, kernel_name="python3",
                   resources={"metadata": {"path": cwd}}).execute()
except Exception as err:  # the cell that failed is in the notebook's outputs too
    error = f"{type(err).__name__}: {str(err)[-2000:]}"
texts = []
for cell in nb.cells:
    if cell.cell_type == "code":
        texts.append("".join(o.get("text", "") for o in cell.get("outputs", [])
                             if o.get("output_type") == "stream"))
json.dump({"error": error, "texts": texts}, open(out, "w"))
"""


def chapters(selected: list[str]) -> list[Path]:
    found = sorted((ROOT / "book").glob("0[1-9]_*.ipynb"))
    if not selected:
        return found
    if not all(k.isdigit() for k in selected):
        raise SystemExit(f"chapters are given by number (1-9), got {selected}")
    picked = [p for p in found if any(p.name.startswith(f"{int(k):02d}_") for k in selected)]
    if len(picked) != len(selected):
        raise SystemExit(f"unknown chapter in {selected}: the chapters are "
                         f"{[p.name for p in found]}")
    return picked


def setup_output(text: str) -> str:
    """The set-up cell's output without pip's index warnings (this machine's mirror settings)."""
    return "\n".join(line for line in text.splitlines()
                     if line.strip() and "WARNING: Location" not in line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("venv", type=Path, help="environment with torch and a Jupyter kernel")
    parser.add_argument("out", type=Path, help="JSON file to write")
    parser.add_argument("chapters", nargs="*", help="chapter numbers (default: all)")
    args = parser.parse_args(argv)
    python = args.venv / "bin" / "python"
    if not python.is_file():
        raise SystemExit(f"{python} does not exist: VENV must be a virtual environment")
    check = subprocess.run([str(python), "-c", "import nbclient, ipykernel, torch"],
                           capture_output=True, text=True)
    if check.returncode != 0:
        raise SystemExit(f"{args.venv} lacks what Colab has before the set-up cell "
                         f"(torch, ipykernel, nbclient):\n{check.stderr[-800:]}")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.strip()
    env = {k: v for k, v in os.environ.items()
           if k not in ("ANCHOR_RESULTS_DIR", "ANCHOR_CACHE_DIR", "PYTHONPATH", "VIRTUAL_ENV")}
    env.setdefault("ANCHOR_PROFILE", "smoke")
    env["PATH"] = f"{args.venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
    work = Path(tempfile.mkdtemp(prefix="colab-check-"))
    remote = work / "anchor-book.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(ROOT), str(remote)], check=True)
    report = {"what": "chapters run as on a new Colab machine: anchor_lib missing, the set-up cell "
                      "cloning the repository and installing it with %pip install -e",
              "command": "python scripts/colab_check.py " + " ".join(map(str, argv or sys.argv[1:])),
              "commit": commit, "when": time.strftime("%Y-%m-%d"), "profile": env["ANCHOR_PROFILE"],
              "data": env.get("ANCHOR_DATA_DIR", "downloaded by torchvision"),
              "environment": f"{platform.platform()}, Python {platform.python_version()}, "
                             f"{provenance.hardware()}",
              "stand_in": "a bare clone of the commit above, in place of " + REPO_URL,
              "chapters": {}}
    failed = 0
    for chapter in chapters(args.chapters):
        subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", "anchor_lib"],
                       env=env, capture_output=True)
        cwd = work / "content"
        shutil.rmtree(cwd, ignore_errors=True)
        cwd.mkdir()
        result = work / "result.json"
        t0 = time.perf_counter()
        done = subprocess.run([str(python), "-c", f"REPO_URL = {REPO_URL!r}\n{RUNNER}",
                               str(chapter), remote.as_uri(), str(cwd), str(result)],
                              env=env, cwd=cwd, capture_output=True, text=True)
        seconds = round(time.perf_counter() - t0, 1)
        if done.returncode != 0 or not result.is_file():
            ran = {"error": f"the runner failed: {done.stderr[-2000:]}", "texts": []}
        else:
            ran = json.loads(result.read_text())
        texts = ran["texts"]
        report["chapters"][chapter.stem] = {
            "ok": ran["error"] is None, "seconds": seconds,
            "setup_output": setup_output(texts[0]) if texts else "",
            "not_found": [line for text in texts for line in text.splitlines()
                          if line.startswith("No ") and " under " in line],
            **({"error": ran["error"]} if ran["error"] else {})}
        failed += ran["error"] is not None
        print(f"{chapter.stem}: {'ok' if ran['error'] is None else 'FAILED'} in {seconds:.0f} s",
              flush=True)
    shutil.rmtree(work, ignore_errors=True)
    # VENV keeps what the chapters' extra pulled in before (Colab has most of it preinstalled);
    # only anchor_lib is removed between chapters. Record what the chapters ran with.
    versions = subprocess.run(
        [str(python), "-c", "import json, importlib.metadata as m; print(json.dumps("
         "{d: m.version(d) for d in " + repr(PACKAGES) + "}))"],
        env=env, capture_output=True, text=True)
    report["packages"] = (json.loads(versions.stdout) if versions.returncode == 0
                          else f"not read: {versions.stderr[-300:]}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    checkpoint.write_sidecar(args.out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

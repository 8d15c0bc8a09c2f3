"""Execute the book's chapters side by side, then let ``jupyter-book build`` take them from its cache.

Jupyter Book 1.x executes the notebooks one after another while Sphinx reads them, so on the
2-core CI machine one core idles through about seven minutes of single-threaded chapters. This
script empties Jupyter Book's execution cache (``execute.cache`` in ``_config.yml``), executes
every chapter of ``_toc.yml`` in its own kernel, ``--jobs`` at a time (default: one per core at
the smoke profile, else one), longest first, with ``book/`` as the working directory, and stores
each executed notebook in that cache. ``_config.yml`` says ``execute_notebooks: cache``, so the
build that follows renders these outputs instead of executing the chapters again. Emptying the
cache first keeps the promise of ``execute_notebooks: force``: every ``make book`` runs every
chapter against the library of the same commit.

A chapter that raises stops the script with exit status 1 and its traceback, before the build
would execute it a second time. The seconds each chapter took are written as JSON to
``--report`` (default ``_build/execution.json``).

Usage (what ``make book`` runs, from the repository root)::

    python scripts/execute_book.py [--jobs N] [--root DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import nbformat
import yaml
from jupyter_cache import get_cache
from jupyter_cache.base import CacheBundleIn
from jupyter_cache.executors.utils import single_nb_execution

ROOT = Path(__file__).resolve().parent.parent
# Chapter seconds from the last committed CPU check (relative to the root): the longest chapters
# start first, so that the last one to finish is not a long one started late.
TIMINGS = Path("data") / "results" / "cpu-checks" / "ci_run.json"


def chapters(root: Path) -> list[Path]:
    """The notebooks ``root/_toc.yml`` lists, in its order (other pages are skipped)."""

    def files(node: object) -> list[str]:
        if isinstance(node, dict):
            found = [node["file"]] if "file" in node else []
            return found + [f for value in node.values() for f in files(value)]
        if isinstance(node, list):
            return [f for item in node for f in files(item)]
        return []

    spec = yaml.safe_load((root / "_toc.yml").read_text())
    names = ([spec["root"]] if "root" in spec else []) + files(spec)
    return [root / f"{name}.ipynb" for name in dict.fromkeys(names)
            if (root / f"{name}.ipynb").exists()]


def longest_first(root: Path, paths: list[Path]) -> list[Path]:
    """Order by the committed CPU timings, longest first; chapters without a timing go first."""
    try:
        seconds = json.loads((root / TIMINGS).read_text())["ci"]["chapter_execution_seconds"]
    except (OSError, KeyError, ValueError):
        seconds = {}
    return sorted(paths, key=lambda p: -seconds.get(p.stem, float("inf")))


def default_jobs() -> int:
    """One chapter per core at ``ANCHOR_PROFILE=smoke`` (what ``make book`` sets: tiny CPU models,
    one thread each); one at a time at any other profile, or none set, where chapters may train
    on a GPU for minutes and would share its memory."""
    return (os.cpu_count() or 1) if os.environ.get("ANCHOR_PROFILE") == "smoke" else 1


def execute(path: Path, timeout: int) -> tuple[Path, nbformat.NotebookNode, float, str | None]:
    """Run one notebook in a fresh kernel with its folder as working directory: the notebook,
    its seconds and, if it failed, the traceback. A cell that raises fails at once; a kernel that
    fails to start or dies (two kernels starting together can race for a port) is retried once
    in a new kernel, then fails."""
    for attempt in (1, 2):
        nb = nbformat.read(path, as_version=4)
        try:
            result = single_nb_execution(nb, cwd=str(path.parent), timeout=timeout,
                                         allow_errors=False)
            break
        except Exception as err:  # not a cell's error: those come back in result.err
            if attempt == 2:
                return path, nb, 0.0, traceback.format_exc()
            print(f"retrying {path.name} in a new kernel after {type(err).__name__}: {err}",
                  file=sys.stderr, flush=True)
    error = None if result.err is None else result.exc_string or repr(result.err)
    return path, nb, result.time, error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=default_jobs(),
                        help="chapters executed at once (default: one per core at the smoke "
                             "profile, else one: bigger profiles train on the GPU)")
    parser.add_argument("--root", type=Path, default=ROOT,
                        help="the folder with _config.yml and _toc.yml (default: this repository)")
    parser.add_argument("--report", type=Path, help="default: ROOT/_build/execution.json")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    root = args.root.resolve()
    report = args.report or root / "_build" / "execution.json"

    config = yaml.safe_load((root / "_config.yml").read_text()).get("execute") or {}
    if config.get("execute_notebooks") != "cache" or not config.get("cache"):
        print("_config.yml must say execute_notebooks: cache and name execute.cache, got "
              f"{config.get('execute_notebooks')!r} and {config.get('cache')!r}", file=sys.stderr)
        return 2
    paths = longest_first(root, chapters(root))
    if not paths:
        print(f"{root / '_toc.yml'} lists no notebook that exists", file=sys.stderr)
        return 2

    cache_dir = root / config["cache"]
    shutil.rmtree(cache_dir, ignore_errors=True)
    cache = get_cache(str(cache_dir))
    start, seconds, failed = time.perf_counter(), {}, []
    with ProcessPoolExecutor(max_workers=min(args.jobs, len(paths))) as pool:
        futures = [pool.submit(execute, p, int(config.get("timeout", 30))) for p in paths]
        for future in as_completed(futures):
            path, nb, took, error = future.result()
            name = path.relative_to(root).as_posix()
            if error is not None:
                failed.append(name)
                print(f"FAILED {name} after {took:.1f} s:\n{error}", file=sys.stderr, flush=True)
                continue
            seconds[path.stem] = round(took, 2)
            cache.cache_notebook_bundle(CacheBundleIn(nb, str(path),
                                                      data={"execution_seconds": took}),
                                        check_validity=False, overwrite=True)
            print(f"executed {name} in {took:.1f} s", flush=True)
    wall = time.perf_counter() - start
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps({
        "jobs": args.jobs, "wall_seconds": round(wall, 2), "failed": sorted(failed),
        "chapter_execution_seconds": dict(sorted(seconds.items()))}, indent=1) + "\n")
    print(f"{len(seconds)} chapters executed in {wall:.1f} s with {args.jobs} at a time"
          + (f"; FAILED: {', '.join(sorted(failed))}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

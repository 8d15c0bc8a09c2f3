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
would execute it a second time. The seconds each chapter took, its slowest cells and the seconds
it spent outside its cells (a stall between cells shows there) are written as JSON to
``--report`` (default ``_build/execution.json``), with every silence of over a minute in the
client's log of the run (``silences``: the seconds, and the log lines before and after it), so
that a stall says where it waited. Each kernel talks to its client over
Unix sockets in a folder of its own, not TCP ports: kernels started together over TCP can race for
the same free port. That folder is also the kernel's ``TMPDIR``, so the run folders a chapter makes
with ``tempfile`` go when the chapter ends instead of piling up in ``/tmp`` build after build
(PyTorch's compile cache stays where it was). The client waits on its kernel in polls of at most
a second (``SlicedChannel``): a wake-up that pyzmq's asyncio poll misses then costs a second, not
the 600 s cell timeout it cost chapter 7 now and then; ``missed_wakeups`` in the report counts
them. A build stopped by SIGTERM or Ctrl-C stops its chapters too, and leaves nothing in the
temporary folder: the workers are killed, their kernels exit with them, and the kernels' folders
are removed. The library's path variables (:data:`PATH_VARIABLES`) are made absolute first, relative
to the folder the script was started from: a kernel's working directory is its chapter's folder, where
``ANCHOR_DATA_DIR=../shared/data/cifar10-jpeg`` given at the repository root would name another one.

At the smoke profile (``--solutions`` elsewhere) each chapter's exercise solutions run too, after
its last cell and in its kernel: their code sits in folded markdown blocks that the book shows but
never executes, so without this a solution could go stale unseen. A solution that raises fails its
chapter; the cached notebook is the chapter as written.

Usage (what ``make book`` runs, from the repository root)::

    python scripts/execute_book.py [--jobs N] [--root DIR] [--[no-]solutions]
"""

from __future__ import annotations

import argparse
import getpass
import importlib.util
import json
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from queue import Empty
from typing import NamedTuple

import nbformat
import yaml
from jupyter_cache import get_cache
from jupyter_cache.base import CacheBundleIn
from jupyter_cache.executors.utils import single_nb_execution
from jupyter_client.asynchronous import AsyncKernelClient
from jupyter_client.channels import AsyncZMQSocketChannel
from traitlets import Type
from traitlets.config import Config

ROOT = Path(__file__).resolve().parent.parent
# Seconds of a chapter's run outside its cells worth a word in the log (start-up and shutdown of a
# kernel take a few; in a CI run of 2026-11-27 chapter 7 spent ten minutes there, its kernel idle).
STALL_SECONDS = 60
# The longest wait of one poll of a kernel's socket (SlicedChannel).
POLL_SLICE = 1.0
# The longest path a Unix socket may have (sun_path: 108 bytes with its terminating NUL).
SOCKET_PATH_MAX = 107
# A build's folder in the temporary folder, each kernel's folder in it (tempfile adds 8
# characters to each), and the kernel's sockets there (kernel-1 to kernel-5).
BUILD_PREFIX, KERNEL_PREFIX, SOCKET_NAME = "anchor-build-", "kernel-", "kernel"
# Chapter seconds from the last committed CPU check (relative to the root): the longest chapters
# start first, so that the last one to finish is not a long one started late.
TIMINGS = Path("data") / "results" / "cpu-checks" / "ci_run.json"
# The environment variables anchor_lib reads as paths (data.py, results.py, compile_cache.py).
PATH_VARIABLES = ("ANCHOR_DATA_DIR", "ANCHOR_CACHE_DIR", "ANCHOR_RESULTS_DIR", "ANCHOR_COMPILE_CACHE")


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


def longest_socket_path(tmpdir: str) -> int:
    """Bytes in the longest path of a kernel's socket under ``tmpdir``: sockets are files,
    ``TMPDIR/anchor-build-XXXXXXXX/kernel-XXXXXXXX/kernel-N`` (N up to 5), and a Unix socket's
    path has at most :data:`SOCKET_PATH_MAX` bytes."""
    return len(os.path.join(tmpdir, BUILD_PREFIX + "x" * 8, KERNEL_PREFIX + "x" * 8,
                            SOCKET_NAME + "-5").encode())


def default_jobs() -> int:
    """One chapter per core at ``ANCHOR_PROFILE=smoke`` (what ``make book`` sets: tiny CPU models,
    one thread each); one at a time at any other profile, or none set, where chapters may train
    on a GPU for minutes and would share its memory."""
    return (os.cpu_count() or 1) if os.environ.get("ANCHOR_PROFILE") == "smoke" else 1


def absolute_path_variables(start: Path | None = None) -> dict[str, str]:
    """Make each relative :data:`PATH_VARIABLES` value in ``os.environ`` absolute, relative to
    ``start`` (default: the working directory, the folder this script was started from); returns
    ``{name: new value}`` for those changed.

    The kernels inherit this environment but run in their chapter's folder, so a relative value
    would name a folder under ``book/`` there and a chapter would not find CIFAR-10. A leading
    ``~`` is expanded too (``compile_cache`` does not expand it); empty values mean "unset" to the
    library and are left alone."""
    start = Path.cwd() if start is None else start
    changed = {}
    for name in PATH_VARIABLES:
        value = os.environ.get(name, "").strip()
        if not value:
            continue
        path = Path(value).expanduser()
        if not path.is_absolute():
            # resolve(): ".." is followed as the shell would from ``start``, symlinks included.
            path = (start / path).resolve()
        if str(path) != value:
            changed[name] = os.environ[name] = str(path)
    return changed


@contextmanager
def kernel_tmpdir(folder: str) -> Iterator[None]:
    """``TMPDIR`` is ``folder`` for the kernels started inside the block (they inherit this
    process's environment; each worker of the pool is a process of its own). Inductor's cache
    keeps its usual place, which it would otherwise derive from ``TMPDIR``, so a chapter that
    compiles does not compile from scratch in every build."""
    saved = {k: os.environ.get(k) for k in ("TMPDIR", "TORCHINDUCTOR_CACHE_DIR")}
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
        tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}"))
    os.environ["TMPDIR"] = folder
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class SlicedChannel(AsyncZMQSocketChannel):
    """A kernel channel that waits for a message in polls of at most ``POLL_SLICE`` seconds.

    pyzmq's asyncio poll can miss the wake-up for a message that has arrived: it then waits out
    its whole timeout and finds the message in its final check, without an error. The notebook
    client polls for a cell's execute reply with the cell timeout (600 s), and a cell with an
    Output widget (``interactive_output``) makes it send on that same shell socket meanwhile (it
    syncs the widget's state back after ``clear_output``), which is when the wake-up went
    missing: chapter 7's explorer cell stalled for 599.8 s, the cell timeout less the cell's own
    0.2 s, with its kernel idle and the reply waiting. In slices, a missed wake-up costs at most
    one slice. ``missed_wakeups`` counts, in this process, the slices that ended with a message
    waiting (a missed wake-up, or a message that came in the slice's last instant)."""

    missed_wakeups = 0

    async def get_msg(self, timeout: float | None = None) -> dict:
        """The next message; ``queue.Empty`` when none came within ``timeout`` seconds (None: wait
        for ever), as the base class."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = POLL_SLICE if deadline is None else min(POLL_SLICE, max(0.0, deadline - time.monotonic()))
            started = time.monotonic()
            if await self.socket.poll(int(wait * 1000)):
                if wait > 0 and time.monotonic() - started >= wait:
                    SlicedChannel.missed_wakeups += 1
                return await self._recv()
            if deadline is not None and time.monotonic() >= deadline:
                raise Empty


class SlicedClient(AsyncKernelClient):
    """The notebook client's kernel client, with :class:`SlicedChannel` for its sockets."""

    shell_channel_class = Type(SlicedChannel)
    iopub_channel_class = Type(SlicedChannel)
    stdin_channel_class = Type(SlicedChannel)
    control_channel_class = Type(SlicedChannel)


class Timeline(logging.Handler):
    """Every record of the notebook client's log (nbclient logs each cell it starts and each
    message the kernel sends, at debug level) and of the kernel manager's, as
    ``(time.monotonic() seconds, its first 120 characters on one line)``, for
    :func:`silences`."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.events: list[tuple[float, str]] = []

    def mark(self, text: str) -> None:
        self.events.append((time.monotonic(), text))

    def emit(self, record: logging.LogRecord) -> None:
        self.mark(" ".join(record.getMessage()[:500].split())[:120])


def silences(events: list[tuple[float, str]], seconds: float) -> list[dict]:
    """The gaps of over ``seconds`` between consecutive events, in order, each as
    ``{"seconds", "after", "before"}`` (the lines either side): where a run waited."""
    return [{"seconds": round(t1 - t0, 2), "after": a, "before": b}
            for (t0, a), (t1, b) in pairwise(events) if t1 - t0 > seconds]


@contextmanager
def client_log(log: logging.Logger, timeline: Timeline) -> Iterator[None]:
    """Inside the block, ``log`` (the notebook client's) and traitlets' logger (the kernel
    manager's: start-up, shutdown) send every record to ``timeline`` and their warnings and
    errors to stderr, and nowhere else. (Before, both logs ended in traitlets' ``NullHandler``,
    so a warning such as nbclient's "Timeout waiting for IOPub output" was never shown.)"""
    loud = logging.StreamHandler(sys.stderr)
    loud.setLevel(logging.WARNING)
    loggers = (log, logging.getLogger("traitlets"))
    saved = [(lg.level, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.DEBUG)
        lg.propagate = False
        lg.addHandler(timeline)
        lg.addHandler(loud)
    try:
        yield
    finally:
        for lg, (level, propagate) in zip(loggers, saved, strict=True):
            lg.removeHandler(timeline)
            lg.removeHandler(loud)
            lg.setLevel(level)
            lg.propagate = propagate


class Executed(NamedTuple):
    """One chapter's run (:func:`execute`)."""

    path: Path
    nb: nbformat.NotebookNode
    seconds: float
    error: str | None           # the traceback, when it failed
    cells: list[list]           # [[cell id, seconds], ...], longest first
    silences: list[dict]        # :func:`silences`
    missed_wakeups: int         # SlicedChannel.missed_wakeups during this run


def execute(path: Path, timeout: int, stall_seconds: float = STALL_SECONDS,
            scratch_root: str | None = None, solutions: bool = False) -> Executed:
    """Run one notebook in a fresh kernel with its folder as working directory: the notebook,
    its seconds, if it failed the traceback, its cells' seconds, the client's silences of over
    ``stall_seconds`` (:func:`silences`; a long cell that prints nothing is one too) and the
    missed wake-ups its polls recovered from (:class:`SlicedChannel`). A cell that raises fails
    at once; a kernel that fails to start or dies is retried once in a new kernel, then fails.
    Each kernel's sockets, connection file and ``TMPDIR`` are in a folder of its own under
    ``scratch_root`` (default: the system's), removed when it is done.

    With ``solutions``, the code of the chapter's exercise solutions (:func:`solution_cells`) runs
    after its last cell, in the same kernel, and a solution that raises fails the chapter like any
    cell; the notebook returned (and cached) is the chapter as written, without them."""
    timeline = Timeline()
    log = logging.getLogger(f"execute_book.{path.stem}")
    SlicedChannel.missed_wakeups = 0   # a worker runs one chapter at a time
    with client_log(log, timeline):
        for attempt in (1, 2):
            nb = nbformat.read(path, as_version=4)
            written = len(nb.cells)
            if solutions:
                nb.cells += solution_cells(nb, path.name)
            with tempfile.TemporaryDirectory(prefix=KERNEL_PREFIX, dir=scratch_root) as scratch, \
                    kernel_tmpdir(scratch):
                config = Config({"KernelManager": {
                    "transport": "ipc", "ip": os.path.join(scratch, SOCKET_NAME),
                    "connection_file": os.path.join(scratch, "kernel.json"),
                    "client_factory": SlicedClient}})
                timeline.mark(f"attempt {attempt}: starting a kernel")
                try:
                    result = single_nb_execution(nb, cwd=str(path.parent), timeout=timeout,
                                                 allow_errors=False, record_timing=True,
                                                 config=config, log=log)
                    break
                except Exception as err:  # not a cell's error: those come back in result.err
                    if attempt == 2:
                        # The wait that ended in this error is a silence too.
                        timeline.mark(f"attempt 2 failed: {type(err).__name__}")
                        del nb.cells[written:]
                        return Executed(path, nb, 0.0, traceback.format_exc(), [],
                                        silences(timeline.events, stall_seconds),
                                        SlicedChannel.missed_wakeups)
                    print(f"retrying {path.name} in a new kernel after {type(err).__name__}: "
                          f"{err}", file=sys.stderr, flush=True)
                finally:
                    timeline.mark("the client returned (its kernel shut down)")
    error = None if result.err is None else result.exc_string or repr(result.err)
    cells = cell_seconds(nb)
    del nb.cells[written:]
    return Executed(path, nb, result.time, error, cells,
                    silences(timeline.events, stall_seconds), SlicedChannel.missed_wakeups)


def solution_cells(nb: nbformat.NotebookNode, name: str) -> list[nbformat.NotebookNode]:
    """The Python code of every exercise solution in ``nb`` (``handout.solution_code``: the
    folded blocks the chapter shows but never runs), as code cells with ids ``solution-<cell
    index>-<block>``, each opening with a comment that names where its code comes from."""
    handout, cells = _handout(), []
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "markdown":
            continue
        for block, code in enumerate(handout.solution_code(cell.source, f"{name}, cell {index}")):
            new = nbformat.v4.new_code_cell(f"# {name}: solution code {block + 1} of markdown cell "
                                            f"{index} (run by execute_book.py)\n{code}")
            new.id = f"solution-{index}-{block}"
            cells.append(new)
    return cells


def _handout():
    """scripts/handout.py, which knows where a solution begins and ends (one parser for both)."""
    spec = importlib.util.spec_from_file_location("handout", Path(__file__).with_name("handout.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cell_seconds(nb: nbformat.NotebookNode) -> list[list]:
    """Every executed code cell's seconds, longest first, ``[[cell id, seconds], ...]``, from the
    timestamps nbclient records in each cell's metadata; the timestamps are removed, so that the
    cached notebook is what it would be without them."""
    took = []
    for i, cell in enumerate(nb.cells):
        stamps = cell.get("metadata", {}).pop("execution", None) or {}
        if "iopub.execute_input" in stamps and "shell.execute_reply" in stamps:
            start, end = (datetime.fromisoformat(stamps[k].replace("Z", "+00:00"))
                          for k in ("iopub.execute_input", "shell.execute_reply"))
            took.append([cell.get("id", str(i)), round((end - start).total_seconds(), 2)])
    return sorted(took, key=lambda c: -c[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=default_jobs(),
                        help="chapters executed at once (default: one per core at the smoke "
                             "profile, else one: bigger profiles train on the GPU)")
    parser.add_argument("--root", type=Path, default=ROOT,
                        help="the folder with _config.yml and _toc.yml (default: this repository)")
    parser.add_argument("--report", type=Path, help="default: ROOT/_build/execution.json")
    parser.add_argument("--solutions", action=argparse.BooleanOptionalAction, default=None,
                        help="also run each chapter's exercise solutions after it (default: at "
                             "the smoke profile only: elsewhere a solution may train for long)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    root = args.root.resolve()
    report = args.report or root / "_build" / "execution.json"
    solutions = (os.environ.get("ANCHOR_PROFILE") == "smoke" if args.solutions is None
                 else args.solutions)

    # SIGTERM (a timeout, a cancelled job) unwinds like Ctrl-C, through the clean-up below.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    config = yaml.safe_load((root / "_config.yml").read_text()).get("execute") or {}
    if config.get("execute_notebooks") != "cache" or not config.get("cache"):
        print("_config.yml must say execute_notebooks: cache and name execute.cache, got "
              f"{config.get('execute_notebooks')!r} and {config.get('cache')!r}", file=sys.stderr)
        return 2
    paths = longest_first(root, chapters(root))
    if not paths:
        print(f"{root / '_toc.yml'} lists no notebook that exists", file=sys.stderr)
        return 2

    # Refuse a TMPDIR too long for the kernels' sockets up front.
    longest = longest_socket_path(tempfile.gettempdir())
    if longest > SOCKET_PATH_MAX:
        print(f"the temporary folder {tempfile.gettempdir()!r} is too long for the kernels' Unix "
              f"sockets ({longest} bytes, at most {SOCKET_PATH_MAX}): set TMPDIR to a shorter "
              f"folder", file=sys.stderr)
        return 2
    # Before any kernel starts (they inherit this environment, in their chapter's folder).
    changed = absolute_path_variables()
    if changed:
        print(f"relative paths made absolute from {Path.cwd()} for the chapters' kernels: "
              + ", ".join(f"{name}={value}" for name, value in changed.items()), flush=True)
    cache_dir = root / config["cache"]
    shutil.rmtree(cache_dir, ignore_errors=True)
    cache = get_cache(str(cache_dir))
    start, seconds, slowest, outside, quiet, failed = time.perf_counter(), {}, {}, {}, {}, []
    missed = {}
    # The workers keep SIGTERM's default (die at once), not the handler installed above: a
    # worker that unwound would take execute()'s retry and start a new kernel.
    # The kernels' folders are in one of this process's, which outlives workers that are killed.
    with tempfile.TemporaryDirectory(prefix=BUILD_PREFIX, ignore_cleanup_errors=True) as scratch, \
            ProcessPoolExecutor(max_workers=min(args.jobs, len(paths)), initializer=signal.signal,
                                initargs=(signal.SIGTERM, signal.SIG_DFL)) as pool:
        futures = [pool.submit(execute, p, int(config.get("timeout", 30)), scratch_root=scratch,
                               solutions=solutions)
                   for p in paths]
        try:
            for future in as_completed(futures):
                path, nb, took, error, cells, gaps, wakeups = future.result()
                name = path.relative_to(root).as_posix()
                if wakeups:
                    missed[path.stem] = wakeups
                if gaps:
                    quiet[path.stem] = gaps
                    for gap in gaps:
                        print(f"{name}: {gap['seconds']:.0f} s without a word from the client, "
                              f"after {gap['after']!r}, before {gap['before']!r}",
                              file=sys.stderr, flush=True)
                if error is not None:
                    failed.append(name)
                    print(f"FAILED {name} after {took:.1f} s:\n{error}", file=sys.stderr, flush=True)
                    continue
                seconds[path.stem] = round(took, 2)
                slowest[path.stem] = cells[:3]
                # Kernel start-up and shutdown take a few seconds; much more means a stall (a late
                # message, say), which the per-cell times would not show.
                outside[path.stem] = round(max(took - sum(c[1] for c in cells), 0.0), 2)
                cache.cache_notebook_bundle(CacheBundleIn(nb, str(path),
                                                          data={"execution_seconds": took}),
                                            check_validity=False, overwrite=True)
                print(f"executed {name} in {took:.1f} s"
                      + (f" (slowest cell {cells[0][0]}: {cells[0][1]:.1f} s)" if cells else "")
                      + (f"; {outside[path.stem]:.0f} s outside its cells (kernel start-up, shutdown "
                         f"or a stalled message)" if outside[path.stem] > STALL_SECONDS else "")
                      + (f"; {wakeups} missed wake-up(s) of its client's polls, each recovered "
                         f"within {POLL_SLICE:g} s" if wakeups else ""),
                      flush=True)
        except BaseException:
            # Interrupted (SIGTERM, Ctrl-C) or broken: the chapters running or queued must not
            # go on in the background. Each kernel exits when its worker does (ipykernel
            # watches its parent process).
            pool.shutdown(wait=False, cancel_futures=True)
            for worker in multiprocessing.active_children():
                worker.kill()
            raise
    wall = time.perf_counter() - start
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps({
        "jobs": args.jobs, "wall_seconds": round(wall, 2), "failed": sorted(failed),
        "solutions_run": solutions,
        "chapter_execution_seconds": dict(sorted(seconds.items())),
        "slowest_cells": dict(sorted(slowest.items())),
        "outside_cells_seconds": dict(sorted(outside.items())),
        "silences": dict(sorted(quiet.items())),
        "missed_wakeups": dict(sorted(missed.items()))}, indent=1) + "\n")
    print(f"{len(seconds)} chapters executed{' with their solutions' if solutions else ''} in "
          f"{wall:.1f} s with {args.jobs} at a time"
          + (f"; FAILED: {', '.join(sorted(failed))}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

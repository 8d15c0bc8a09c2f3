"""scripts/execute_book.py: chapters run side by side into the cache Jupyter Book then reads."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from queue import Empty
from types import SimpleNamespace

import by_path
import nbformat
import pytest
from jupyter_cache import get_cache
from jupyter_client.channels import AsyncZMQSocketChannel

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "execute_book.py"
KERNEL = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}

# Each chapter notes when it started and stopped (and where it ran) in a file beside it.
_STAMP = """
import json, os, time
start = time.time()
time.sleep({sleep})
with open("{name}.json", "w") as f:
    json.dump({{"start": start, "end": time.time(), "cwd": os.getcwd()}}, f)
{extra}
"""


def _book(root: Path, chapters: dict[str, str], execute: str = "cache") -> None:
    (root / "book").mkdir(parents=True)
    (root / "book" / "index.md").write_text("# Index\n")
    for name, code in chapters.items():
        nb = nbformat.v4.new_notebook(metadata=KERNEL)
        nb.cells = [nbformat.v4.new_markdown_cell(f"# {name}"), nbformat.v4.new_code_cell(code)]
        nbformat.write(nb, root / "book" / f"{name}.ipynb")
    (root / "_config.yml").write_text(
        f"execute:\n  execute_notebooks: {execute}\n  cache: _build/.jupyter_cache\n"
        "  timeout: 60\n")
    toc = "format: jb-book\nroot: book/index\nparts:\n  - caption: Chapters\n    chapters:\n"
    (root / "_toc.yml").write_text(toc + "".join(f"      - file: book/{n}\n" for n in chapters))


def _script():
    """scripts/execute_book.py as a module (it is a script, not part of the package)."""
    return by_path.load("scripts/execute_book.py")


def _run(root: Path, *args: str, tmp: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--root", str(root), *args],
                          capture_output=True, text=True, timeout=120, env=_env(tmp))


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """An empty folder directly in the system's temporary folder, as a build's ``TMPDIR``, so
    that a test sees what the build leaves there (pytest's ``tmp_path`` is too long a path for
    the kernels' Unix sockets)."""
    folder = Path(tempfile.mkdtemp(prefix="eb-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _env(tmp: Path | None) -> dict[str, str]:
    return {**os.environ, **({"TMPDIR": str(tmp)} if tmp else {})}


def _left_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


_SOLUTIONS = """**1.** Write `answer` to a file.

```{{admonition}} Solution
:class: dropdown
~~~python
with open("{name}.solution", "w") as f:
    f.write(str(answer))
~~~
```

**2.** Divide.

::::{{admonition}} Solution
:class: dropdown
```python
{second}
```
::::
"""


def _add_solutions(root: Path, name: str, second: str) -> None:
    """Chapter ``name`` of :func:`_book` ends with :data:`_SOLUTIONS`, ``second`` as its code."""
    path = root / "book" / f"{name}.ipynb"
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_markdown_cell(_SOLUTIONS.format(name=name, second=second)))
    nbformat.write(nb, path)


def test_solutions_run_after_their_chapter_and_a_broken_one_fails_it(tmp_path, short_tmp):
    """Each solution's code runs after the chapter's last cell, in its kernel (it sees the
    chapter's variables); the cache keeps the chapter as written; a solution that raises fails
    its chapter, naming where the code came from; --no-solutions leaves them alone."""
    _book(tmp_path, {"good": "answer = 42", "bad": "answer = 7"})
    for name, second in (("good", "ratio = answer / 2"), ("bad", "ratio = answer / 0")):
        _add_solutions(tmp_path, name, second)
    done = _run(tmp_path, "--jobs", "2", "--solutions", tmp=short_tmp)
    assert done.returncode == 1
    assert (tmp_path / "book" / "good.solution").read_text() == "42"
    assert (tmp_path / "book" / "bad.solution").read_text() == "7"  # its first solution ran
    assert "FAILED book/bad.ipynb" in done.stderr and "ZeroDivisionError" in done.stderr
    assert "bad.ipynb: solution code 2 of markdown cell 2 (run by execute_book.py)" in done.stderr
    report = json.loads((tmp_path / "_build" / "execution.json").read_text())
    assert report["failed"] == ["book/bad.ipynb"] and report["solutions_run"] is True
    assert {c[0] for c in report["slowest_cells"]["good"]} >= {"solution-2-0", "solution-2-1"}
    cache = get_cache(str(tmp_path / "_build" / ".jupyter_cache"))
    good = nbformat.read(tmp_path / "book" / "good.ipynb", as_version=4)
    _, merged = cache.merge_match_into_notebook(good)
    assert len(merged.cells) == 3   # the chapter as written, its solutions not among its cells

    (tmp_path / "book" / "bad.solution").unlink()
    done = _run(tmp_path, "--jobs", "2", "--no-solutions", tmp=short_tmp)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "book" / "bad.solution").exists()
    assert json.loads((tmp_path / "_build" / "execution.json").read_text())["solutions_run"] is False


def test_solutions_run_by_default_at_the_smoke_profile_only(tmp_path, short_tmp, monkeypatch):
    _book(tmp_path, {"c": "answer = 1"})
    _add_solutions(tmp_path, "c", "pass")
    for profile, ran in (("demo", False), ("smoke", True)):
        monkeypatch.setenv("ANCHOR_PROFILE", profile)
        assert _run(tmp_path, "--jobs", "1", tmp=short_tmp).returncode == 0
        assert (tmp_path / "book" / "c.solution").exists() == ran, profile


def test_solution_code_is_the_python_of_solution_blocks_only():
    handout = by_path.load("scripts/handout.py")
    text = (_SOLUTIONS.format(name="x", second="b = 2")
            + "\n~~~python\nnot_a_solution = 1\n~~~\n")   # a code block outside any solution
    assert handout.solution_code(text) == [
        'with open("x.solution", "w") as f:\n    f.write(str(answer))', "b = 2"]
    assert handout.solution_code("**1.** No solution here.") == []
    with pytest.raises(handout.HandoutError, match="never closed"):
        handout.solution_code("```{admonition} Solution\n~~~python\nx = 1\n~~~\n")


def test_chapters_run_side_by_side_into_the_cache_the_build_reads(tmp_path, short_tmp):
    # Each chapter also makes a run folder with tempfile, as chapters 1, 2, 6 and 7 do.
    leftover = ("import tempfile\nwith open('{name}.tmp.json', 'w') as f:\n"
                "    json.dump({{'made': tempfile.mkdtemp(prefix='run-'), "
                "'inductor': os.environ.get('TORCHINDUCTOR_CACHE_DIR')}}, f)")
    _book(tmp_path, {name: _STAMP.format(sleep=2, name=name, extra=leftover.format(name=name))
                     for name in ("a", "b")})
    stale = tmp_path / "_build" / ".jupyter_cache" / "stale"
    stale.mkdir(parents=True)   # an earlier build's cache is emptied, not reused
    started = time.monotonic()
    done = _run(tmp_path, "--jobs", "2", tmp=short_tmp)
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert not stale.exists()

    stamps = {n: json.loads((tmp_path / "book" / f"{n}.json").read_text()) for n in ("a", "b")}
    assert all(s["cwd"] == str(tmp_path / "book") for s in stamps.values())
    # Side by side: each chapter started before the other one ended.
    assert stamps["a"]["start"] < stamps["b"]["end"] and stamps["b"]["start"] < stamps["a"]["end"]

    # What Jupyter Book's cache mode looks up: the committed notebook (no outputs) matches a
    # cached, executed one, and merging gives the executed outputs.
    cache = get_cache(str(tmp_path / "_build" / ".jupyter_cache"))
    for name in ("a", "b"):
        nb = nbformat.read(tmp_path / "book" / f"{name}.ipynb", as_version=4)
        assert cache.match_cache_notebook(nb) is not None
        _, merged = cache.merge_match_into_notebook(nb)
        assert merged.cells[1].execution_count == 1

    report = json.loads((tmp_path / "_build" / "execution.json").read_text())
    assert report["jobs"] == 2 and report["failed"] == []
    # Side by side, the build's wall time is about the longer chapter's, not their sum.
    assert max(report["chapter_execution_seconds"].values()) <= report["wall_seconds"] <= took
    assert set(report["chapter_execution_seconds"]) == {"a", "b"}
    assert all(s >= 2 for s in report["chapter_execution_seconds"].values())
    # Where a chapter's time went: its one code cell, which slept 2 s.
    for name in ("a", "b"):
        nb = nbformat.read(tmp_path / "book" / f"{name}.ipynb", as_version=4)
        [(cell_id, seconds)] = report["slowest_cells"][name]
        assert cell_id == nb.cells[1].id and 2 <= seconds < report["chapter_execution_seconds"][name]
        # The rest of the chapter's time: its kernel's start-up and shutdown.
        assert report["outside_cells_seconds"][name] == pytest.approx(
            report["chapter_execution_seconds"][name] - seconds, abs=0.02)
        _, merged = cache.merge_match_into_notebook(nb)
        assert "execution" not in merged.cells[1].metadata  # the timestamps are not cached
    assert report["silences"] == {}   # no minute without a word from the client
    # The kernels talked over Unix sockets, not TCP ports two kernels could race for.
    assert "Kernel is running over TCP" not in done.stderr
    assert _left_in(short_tmp) == []   # the kernels' sockets and connection files went too
    # The chapters' temporary folders went with their kernels; inductor's cache did not move
    # into them (it would be rebuilt from scratch in every build).
    for name in ("a", "b"):
        made = json.loads((tmp_path / "book" / f"{name}.tmp.json").read_text())
        assert Path(made["made"]).name.startswith("run-") and not Path(made["made"]).exists()
        assert made["inductor"] and not made["inductor"].startswith(str(Path(made["made"]).parent))


def test_silences_are_the_gaps_between_log_lines_longer_than_the_threshold():
    module = _script()
    events = [(0.0, "start"), (1.0, "Executing cell: x = 1"), (70.5, "msg_type: status"),
              (71.0, "kernel shut down"), (200.0, "next")]
    assert module.silences(events, 60) == [
        {"seconds": 69.5, "after": "Executing cell: x = 1", "before": "msg_type: status"},
        {"seconds": 129.0, "after": "kernel shut down", "before": "next"}]
    assert module.silences(events, 200) == [] and module.silences(events[:1], 0) == []
    assert module.silences([(0.0, "a"), (60.0, "b")], 60) == []  # "over", not "at least"


class _MissesWakeUps:
    """A socket whose poll misses every wake-up, as pyzmq's asyncio poll now and then does: it
    answers only when its timeout ends, then says whether a message is waiting."""

    def __init__(self, message_at: float) -> None:
        self.message_at, self.timeouts_ms = message_at, []

    async def poll(self, timeout_ms: int | None) -> int:
        self.timeouts_ms.append(timeout_ms)
        if timeout_ms is None:   # a wait for ever that a missed wake-up never ends
            await asyncio.sleep(3600)
        await asyncio.sleep(timeout_ms / 1000)
        return int(time.monotonic() >= self.message_at)


def _channel(module, socket: _MissesWakeUps):
    channel = module.SlicedChannel.__new__(module.SlicedChannel)   # no real socket needed
    channel.socket = socket

    async def recv():
        return {"msg_type": "execute_reply"}

    channel._recv = recv
    return channel


@pytest.mark.fault(cases=3)
def test_a_missed_wake_up_costs_one_slice_not_the_whole_timeout(monkeypatch):
    """The chapter-7 stall: the reply was waiting, the poll missed its wake-up and waited out the
    600 s cell timeout. The sliced poll finds it at the end of its slice."""
    module = _script()
    monkeypatch.setattr(module, "POLL_SLICE", 0.05)
    module.SlicedChannel.missed_wakeups = 0

    async def timed(get, *args):
        start = time.monotonic()
        try:
            return await get(*args), time.monotonic() - start
        except Empty:
            return "empty", time.monotonic() - start

    # The base class waits out its whole timeout for a message that is already there ...
    waiting = _channel(module, _MissesWakeUps(message_at=0.0))
    got, took = asyncio.run(timed(AsyncZMQSocketChannel.get_msg, waiting, 0.5))
    assert got["msg_type"] == "execute_reply" and took >= 0.5
    # ... the sliced one for one slice of it, and counts the missed wake-up.
    got, took = asyncio.run(timed(waiting.get_msg, 600))
    assert got["msg_type"] == "execute_reply" and took < 0.5
    assert waiting.socket.timeouts_ms[-1] == 50 and module.SlicedChannel.missed_wakeups == 1
    # Without a timeout too (the client's wait for output), where the base class would hang.
    later = _channel(module, _MissesWakeUps(message_at=time.monotonic() + 0.12))
    got, took = asyncio.run(timed(later.get_msg, None))
    assert got["msg_type"] == "execute_reply" and 0.12 <= took < 0.5
    assert set(later.socket.timeouts_ms) == {50}
    # No message: Empty once the timeout is over, as the base class says, not a slice early.
    never = _channel(module, _MissesWakeUps(message_at=float("inf")))
    got, took = asyncio.run(timed(never.get_msg, 0.2))
    assert got == "empty" and 0.2 <= took < 0.45
    got, took = asyncio.run(timed(never.get_msg, 0))
    assert got == "empty" and never.socket.timeouts_ms[-1] == 0


def test_output_widgets_do_not_stall_the_client(tmp_path):
    """The real trigger, in a real kernel: chapter 7's explorer is an ``interactive_output``,
    whose ``clear_output`` nbclient answers by sending the widget's state on the shell socket
    while it waits there for the cell's execute reply, and that wait can miss the reply's
    wake-up (about one cell in twenty here). With one long poll such a cell sat out its whole
    timeout after the kernel was idle (the 600 s stall); sliced, it waits at most a slice. It is
    a race: with POLL_SLICE = 600 this test failed in ten runs of twelve on the development
    machine (2026-11-27), so it need not fail every time."""
    module = _script()
    widget = ("out = W.interactive_output(lambda i: print(i), {'i': W.IntSlider(3)})\n"
              "display(out)")
    nb = nbformat.v4.new_notebook(metadata=KERNEL)
    nb.cells = [nbformat.v4.new_code_cell("import ipywidgets as W\n"
                                          "from IPython.display import display")]
    nb.cells += [nbformat.v4.new_code_cell(widget) for _ in range(40)]
    nbformat.write(nb, tmp_path / "w.ipynb")
    # A stalled cell waits out its timeout (10 s) after the kernel's idle message; 4 s clears the
    # 2.5 s a busy machine's kernel may take to exit at the end (then the client terminates it).
    run = module.execute(tmp_path / "w.ipynb", timeout=10, stall_seconds=4)
    assert run.error is None
    assert [g for g in run.silences if "'execution_state': 'idle'" in g["after"]] == []


def test_a_silent_wait_is_reported_with_the_log_lines_around_it(tmp_path, monkeypatch):
    """A real kernel: a cell that sleeps without printing is a silence in the client's log,
    between the line that started the cell and the kernel's next message."""
    module = _script()
    traitlets = logging.getLogger("traitlets")
    before = (list(traitlets.handlers), traitlets.level, traitlets.propagate)
    nb = nbformat.v4.new_notebook(metadata=KERNEL)
    nb.cells = [nbformat.v4.new_code_cell("print('hello')"),
                nbformat.v4.new_code_cell("import time; time.sleep(5)")]
    nbformat.write(nb, tmp_path / "a.ipynb")
    polls = []
    sliced = module.SlicedChannel.get_msg

    async def counted(channel, timeout=None):
        polls.append(timeout)
        return await sliced(channel, timeout)

    monkeypatch.setattr(module.SlicedChannel, "get_msg", counted)
    run = module.execute(tmp_path / "a.ipynb", timeout=30, stall_seconds=4)
    took, error, gaps = run.seconds, run.error, run.silences
    assert error is None and took >= 5
    # The client waited on the kernel through the sliced polls, the cell timeout among them.
    assert 30 in polls and run.missed_wakeups >= 0
    [gap] = [g for g in gaps if "time.sleep(5)" in g["after"]]
    # The last line before it is the kernel's echo of the cell it started (execute_input).
    assert gap["after"].startswith("content: {'code': 'import time; time.sleep(5)'")
    assert 5 <= gap["seconds"] <= took and gap["before"].startswith("msg_type:")
    # The client's debug lines went to the timeline, not to this process's log.
    assert not logging.getLogger("execute_book.a").handlers
    assert (traitlets.handlers, traitlets.level, traitlets.propagate) == before


def test_a_chapter_that_raises_fails_the_run_with_its_traceback(tmp_path):
    _book(tmp_path, {"good": _STAMP.format(sleep=0, name="good", extra=""),
                     "bad": _STAMP.format(sleep=0, name="bad",
                                          extra="raise ValueError('chapter broke')")})
    report = tmp_path / "reports" / "of" / "today.json"  # --report makes its folders
    done = _run(tmp_path, "--report", str(report))
    assert done.returncode == 1
    assert "FAILED book/bad.ipynb" in done.stderr and "chapter broke" in done.stderr
    assert json.loads(report.read_text())["failed"] == ["book/bad.ipynb"]
    cache = get_cache(str(tmp_path / "_build" / ".jupyter_cache"))
    bad = nbformat.read(tmp_path / "book" / "bad.ipynb", as_version=4)
    with pytest.raises(KeyError):   # not cached, so a build would not render it as executed
        cache.match_cache_notebook(bad)


@pytest.mark.fault(cases=1)
def test_a_terminated_build_leaves_nothing_running(tmp_path, short_tmp):
    """SIGTERM (a timeout, a cancelled job) stops the chapter that runs and the ones queued,
    instead of leaving the workers to go on in the background."""
    _book(tmp_path, {"a": "import os, time\nopen('a.pid', 'w').write(str(os.getpid()))\n"
                          "time.sleep(60)",
                     "b": "open('b.ran', 'w').write('ran')"})
    build = subprocess.Popen([sys.executable, str(SCRIPT), "--root", str(tmp_path), "--jobs", "1"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=_env(short_tmp))
    pid_file = tmp_path / "book" / "a.pid"
    deadline = time.monotonic() + 60
    while not pid_file.exists() and build.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pid_file.exists(), build.communicate()
    time.sleep(0.5)   # the pid is written before the file is closed
    kernel = int(pid_file.read_text())
    build.terminate()
    assert build.wait(timeout=30) == 128 + signal.SIGTERM  # the shell's code for "terminated"

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    deadline = time.monotonic() + 20   # a kernel checks on its parent once a second
    while alive(kernel) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(kernel), "chapter a's kernel outlived the build"
    time.sleep(3)
    assert not (tmp_path / "book" / "b.ran").exists(), "the queued chapter ran after the build"
    # The killed kernel's sockets and connection file went with the build's folder.
    assert _left_in(short_tmp) == []


@pytest.mark.bad_input(cases=4)
def test_bad_setup_is_refused_with_what_was_expected(tmp_path):
    _book(tmp_path / "force", {"a": "1"}, execute="force")
    done = _run(tmp_path / "force")
    assert done.returncode == 2 and "execute_notebooks: cache" in done.stderr
    assert "'force'" in done.stderr

    _book(tmp_path / "ok", {"a": "1"})
    done = _run(tmp_path / "ok", "--jobs", "0")
    assert done.returncode == 2 and "--jobs must be >= 1, got 0" in done.stderr

    (tmp_path / "ok" / "book" / "a.ipynb").unlink()
    done = _run(tmp_path / "ok")
    assert done.returncode == 2 and "lists no notebook that exists" in done.stderr

    # A TMPDIR too long for the kernels' sockets is refused before any kernel starts, not
    # after each chapter's two failed starts.
    long_tmp = tmp_path / ("t" * 60)
    long_tmp.mkdir()
    _book(tmp_path / "long", {"a": "1"})
    done = _run(tmp_path / "long", tmp=long_tmp)
    assert done.returncode == 2 and "too long for the kernels' Unix sockets" in done.stderr
    assert str(long_tmp) in done.stderr and _left_in(long_tmp) == []


def test_relative_path_variables_are_made_absolute_from_the_starting_folder(tmp_path, monkeypatch):
    """Only relative, non-empty values change, each against the folder the script started in."""
    module = _script()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ANCHOR_DATA_DIR", "../shared/data/cifar10-jpeg")   # as the README says
    monkeypatch.setenv("ANCHOR_CACHE_DIR", "data/cache")
    monkeypatch.setenv("ANCHOR_RESULTS_DIR", "/already/absolute")
    monkeypatch.setenv("ANCHOR_COMPILE_CACHE", "")                          # unset, to the library
    changed = module.absolute_path_variables()
    expected = {"ANCHOR_DATA_DIR": str(tmp_path.parent / "shared" / "data" / "cifar10-jpeg"),
                "ANCHOR_CACHE_DIR": str(tmp_path / "data" / "cache")}
    assert changed == expected
    assert {name: os.environ[name] for name in expected} == expected
    assert os.environ["ANCHOR_RESULTS_DIR"] == "/already/absolute"
    assert os.environ["ANCHOR_COMPILE_CACHE"] == ""
    monkeypatch.setenv("ANCHOR_COMPILE_CACHE", "~/cc")   # compile_cache.py would not expand it
    assert module.absolute_path_variables() == {"ANCHOR_COMPILE_CACHE": str(tmp_path / "home" / "cc")}
    # Every path the library reads from the environment is among them.
    library = Path(__file__).resolve().parent.parent / "anchor_lib"
    read = {name for f in library.glob("*.py")
            for name in re.findall(r"environ\.get\(\"(ANCHOR_\w+_DIR)\"", f.read_text())}
    assert read and read <= set(module.PATH_VARIABLES)


def test_a_relative_data_dir_reaches_the_chapters_as_an_absolute_path(tmp_path):
    """A real kernel runs in book/; ANCHOR_DATA_DIR=data/cifar given from the root still names the
    root's data/cifar there, and the build says it made the path absolute."""
    (tmp_path / "data" / "cifar").mkdir(parents=True)
    _book(tmp_path, {"a": "import json, os\nvalue = os.environ['ANCHOR_DATA_DIR']\n"
                          "json.dump([value, os.path.isdir(value)], open('a.env.json', 'w'))"})
    done = subprocess.run([sys.executable, str(SCRIPT), "--root", ".", "--jobs", "1"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**_env(None), "ANCHOR_DATA_DIR": "data/cifar"})
    assert done.returncode == 0, done.stderr
    value, found = json.loads((tmp_path / "book" / "a.env.json").read_text())
    assert (value, found) == (str(tmp_path / "data" / "cifar"), True)
    assert f"ANCHOR_DATA_DIR={tmp_path / 'data' / 'cifar'}" in done.stdout


def test_chapters_run_side_by_side_only_at_the_smoke_profile(monkeypatch):
    module = _script()
    monkeypatch.setattr(module.os, "cpu_count", lambda: 4)
    monkeypatch.setenv("ANCHOR_PROFILE", "smoke")
    assert module.default_jobs() == 4
    for profile in ("demo", "full"):   # chapters that may train on one GPU: one at a time
        monkeypatch.setenv("ANCHOR_PROFILE", profile)
        assert module.default_jobs() == 1
    monkeypatch.delenv("ANCHOR_PROFILE")
    assert module.default_jobs() == 1
    monkeypatch.setenv("ANCHOR_PROFILE", "smoke")
    monkeypatch.setattr(module.os, "cpu_count", lambda: None)  # a count Python cannot tell
    assert module.default_jobs() == 1


@pytest.mark.fault(cases=2)
def test_a_kernel_that_fails_to_start_is_retried_once_then_reported(tmp_path, monkeypatch):
    module = _script()
    nbformat.write(nbformat.v4.new_notebook(metadata=KERNEL), tmp_path / "a.ipynb")
    calls = []

    def kernel(fails: int):
        """single_nb_execution whose kernel fails to start on the first ``fails`` calls."""
        def run(nb, **kwargs):
            calls.append(kwargs["cwd"])
            if len(calls) <= fails:
                raise RuntimeError("Kernel died before replying to kernel_info")
            return SimpleNamespace(time=0.5, err=None, exc_string=None)
        return run

    monkeypatch.setattr(module, "single_nb_execution", kernel(fails=1))
    run = module.execute(tmp_path / "a.ipynb", timeout=30)
    assert run.error is None and run.seconds == 0.5 and calls == [str(tmp_path)] * 2

    calls.clear()
    monkeypatch.setattr(module, "single_nb_execution", kernel(fails=2))
    run = module.execute(tmp_path / "a.ipynb", timeout=30)
    assert len(calls) == 2 and "RuntimeError: Kernel died before replying" in run.error


def test_chapters_are_the_tocs_notebooks_in_its_order(tmp_path):
    module = _script()
    (tmp_path / "book").mkdir()
    for name in ("intro", "one", "two", "three"):
        nbformat.write(nbformat.v4.new_notebook(metadata=KERNEL), tmp_path / "book" / f"{name}.ipynb")
    (tmp_path / "book" / "page.md").write_text("# a page, not a notebook\n")
    (tmp_path / "_toc.yml").write_text(
        "root: book/intro\nparts:\n  - chapters:\n      - file: book/two\n"
        "        sections:\n          - file: book/one\n      - file: book/page\n"
        "      - file: book/missing\n  - chapters:\n      - file: book/three\n"
        "      - file: book/two\n")
    names = [p.stem for p in module.chapters(tmp_path)]
    assert names == ["intro", "two", "one", "three"]  # root first, each once, notebooks only
    (tmp_path / "_toc.yml").write_text("chapters:\n  - file: book/three\n  - file: book/one\n")
    assert [p.stem for p in module.chapters(tmp_path)] == ["three", "one"]  # no root: fine


def test_cell_seconds_are_read_from_both_timestamps_and_removed():
    module = _script()
    nb = nbformat.v4.new_notebook()
    stamps = {"iopub.execute_input": "2026-11-27T10:00:00.000000Z",
              "shell.execute_reply": "2026-11-27T10:00:02.500000Z"}
    nb.cells = [nbformat.v4.new_code_cell("a", metadata={"execution": dict(stamps)}),
                nbformat.v4.new_code_cell("b", metadata={"execution": {
                    "iopub.execute_input": stamps["iopub.execute_input"]}}),  # never replied
                nbformat.v4.new_code_cell("c", metadata={"execution": {
                    "shell.execute_reply": stamps["shell.execute_reply"]}}),
                nbformat.v4.new_markdown_cell("text")]
    nb.cells.insert(0, nbformat.v4.new_code_cell("z", metadata={"execution": {
        **stamps, "shell.execute_reply": "2026-11-27T10:00:01.000000Z"}}))
    assert module.cell_seconds(nb) == [[nb.cells[1].id, 2.5], [nb.cells[0].id, 1.0]]  # longest first
    assert all("execution" not in cell.metadata for cell in nb.cells)


def test_a_failed_cells_error_is_its_traceback(tmp_path, monkeypatch):
    """nbclient's traceback text (``exc_string``) when there is one, else the exception's repr."""
    module = _script()
    nbformat.write(nbformat.v4.new_notebook(metadata=KERNEL), tmp_path / "a.ipynb")
    for exc_string in ("Traceback ...\nValueError: chapter broke", None):
        err = ValueError("chapter broke")
        monkeypatch.setattr(module, "single_nb_execution", lambda nb, _e=err, _s=exc_string, **kw:
                            SimpleNamespace(time=0.1, err=_e, exc_string=_s))
        run = module.execute(tmp_path / "a.ipynb", timeout=30)
        assert run.error == (exc_string or repr(err))


def test_client_log_keeps_the_clients_records_out_of_other_logs():
    module = _script()
    seen = []

    class Catch(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    root = logging.getLogger()
    catch = Catch(logging.DEBUG)
    root.addHandler(catch)
    timeline = module.Timeline()
    log = logging.getLogger("execute_book.test")
    try:
        with module.client_log(log, timeline):
            log.debug("a cell started")
            logging.getLogger("traitlets").info("a kernel started")
            log.debug("x" * 300 + "\n  y")  # one line, its first 120 characters
    finally:
        root.removeHandler(catch)
    assert [text for _, text in timeline.events] == ["a cell started", "a kernel started", "x" * 120]
    assert seen == []  # not propagated to the root logger (the console, pytest's capture)


def test_the_socket_path_limit_is_the_systems(tmp_path, monkeypatch):
    """SOCKET_PATH_MAX is the longest path a Unix socket binds to here, and a temporary folder
    that gives exactly that much is accepted."""
    import socket

    module = _script()
    if not hasattr(socket, "AF_UNIX") or sys.platform != "linux":
        pytest.skip("the 107-byte limit is Linux's sun_path")
    base = Path(tempfile.mkdtemp(prefix="sp-"))
    try:
        fill = module.SOCKET_PATH_MAX - len(str(base)) - 1
        for extra, fits in ((0, True), (1, False)):
            path = str(base / ("s" * (fill + extra)))
            with socket.socket(socket.AF_UNIX) as sock:
                if fits:
                    sock.bind(path)
                else:
                    with pytest.raises(OSError):
                        sock.bind(path)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    _book(tmp_path, {"a": "1"})
    exact = "/" + "t" * (module.SOCKET_PATH_MAX - module.longest_socket_path("/t") + 1)
    assert module.longest_socket_path(exact) == module.SOCKET_PATH_MAX
    monkeypatch.setattr(module.tempfile, "gettempdir", lambda: exact)

    class Reached(Exception):
        pass

    def get_cache(path):
        raise Reached  # past the check: nothing more needs to run

    monkeypatch.setattr(module, "get_cache", get_cache)
    monkeypatch.setattr(module.signal, "signal", lambda *args: None)  # keep pytest's SIGTERM
    with pytest.raises(Reached):
        module.main(["--root", str(tmp_path)])


def test_longest_chapters_start_first(tmp_path):
    module = _script()
    paths = [tmp_path / f"{name}.ipynb" for name in ("short", "new", "long", "mid")]
    assert module.longest_first(tmp_path, paths) == paths  # no timings: the toc's order
    timings = tmp_path / module.TIMINGS
    timings.parent.mkdir(parents=True)
    timings.write_text(json.dumps({"ci": {"chapter_execution_seconds": {
        "short": 5.0, "long": 60.0, "mid": 20.0}}}))
    # A chapter without a timing first (it may be long), then the longest.
    assert [p.stem for p in module.longest_first(tmp_path, paths)] == ["new", "long", "mid", "short"]


def test_a_prompt_message_is_no_missed_wake_up(monkeypatch):
    module = _script()
    monkeypatch.setattr(module, "POLL_SLICE", 0.05)
    module.SlicedChannel.missed_wakeups = 0

    class Prompt:
        async def poll(self, timeout_ms):
            return 1  # the message is there and the poll says so at once

    for timeout in (600, None, 0):  # a zero-second poll that finds the message missed nothing
        got = asyncio.run(_channel(module, Prompt()).get_msg(timeout))
        assert got["msg_type"] == "execute_reply" and module.SlicedChannel.missed_wakeups == 0

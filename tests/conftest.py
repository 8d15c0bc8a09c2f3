"""Test-wide settings."""

import functools
import json
import os
from collections import Counter

import pytest
import torch

# Tiny models gain nothing from a second thread, and OpenMP's spin-waiting makes them up to 100x
# slower when another process holds the other core. One thread keeps every test fast and steady.
torch.set_num_threads(int(os.environ.get("ANCHOR_TEST_THREADS", "1")))
# The same for the processes tests start (notebook kernels, the CLI, torchrun's workers) where a
# test does not choose: a chapter's kernel with two threads ran 4x slower beside another worker.
os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("ANCHOR_TEST_THREADS", "1"))


# --- Reliability counts (README "Reliability", issue 6) ----------------------------------------
#
# Tests marked ``bad_input`` feed the API or the command line input it must reject; tests marked
# ``fault`` inject a fault (kill -9, a damaged file, NaN, missing data). A parametrised case counts
# once, a Hypothesis test counts its ``max_examples`` (and the run checks they all ran), and
# ``@pytest.mark.fault(cases=N)`` says one test body injects N faults. At the end of a run that
# includes such tests, pytest prints e.g. "reliability: 123 bad-input cases and 17 injected faults
# exercised, all handled"; ``ANCHOR_RELIABILITY_COUNTS=1 pytest --collect-only`` prints the counts
# of the collected tests as JSON (what tests/test_reliability.py checks the README against).

RELIABILITY_KINDS = {"bad_input": "bad-input cases", "fault": "injected faults"}
_EXECUTED = pytest.StashKey[int]()
_TALLY: dict[str, Counter] = {"handled": Counter(), "failed": Counter(), "short": Counter()}


def reliability_cases(item) -> tuple[str, int] | None:
    """(kind, number of cases) of a collected test, or None if it is not a reliability test."""
    for kind in RELIABILITY_KINDS:
        marker = item.get_closest_marker(kind)
        if marker is None:
            continue
        cases = int(marker.kwargs.get("cases", 1))
        obj = getattr(item, "obj", None)
        if getattr(obj, "is_hypothesis_test", False):
            cases *= obj._hypothesis_internal_use_settings.max_examples
        return kind, cases
    return None


def reliability_counts(items) -> dict[str, int]:
    counts = dict.fromkeys(RELIABILITY_KINDS, 0)
    for item in items:
        found = reliability_cases(item)
        if found:
            counts[found[0]] += found[1]
    return counts


def pytest_collection_finish(session):
    if os.environ.get("ANCHOR_RELIABILITY_COUNTS") == "1":
        print(f"\nreliability-counts: {json.dumps(reliability_counts(session.items))}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """Count the examples a reliability Hypothesis test really ran (its inner test's calls)."""
    handle = getattr(getattr(item, "obj", None), "hypothesis", None)
    if handle is None or reliability_cases(item) is None:
        yield
        return
    inner, calls = handle.inner_test, [0]

    @functools.wraps(inner)
    def counted(*args, **kwargs):
        calls[0] += 1
        return inner(*args, **kwargs)

    handle.inner_test = counted
    try:
        yield
    finally:
        handle.inner_test = inner
        item.stash[_EXECUTED] = calls[0]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Attach what a reliability test exercised to its report (under pytest-xdist the report
    travels from the worker to the controller, which tallies it in pytest_runtest_logreport)."""
    report = (yield).get_result()
    found = reliability_cases(item)
    if found is None or report.skipped or (report.when != "call" and report.passed):
        return
    kind, declared = found
    ran = 0 if report.failed else item.stash.get(_EXECUTED, declared)
    report.user_properties.append(("reliability", {"kind": kind, "declared": declared,
                                                   "ran": ran, "failed": report.failed}))


def pytest_runtest_logreport(report):
    for name, value in report.user_properties:
        if name != "reliability":
            continue
        kind, declared = value["kind"], value["declared"]
        if value["failed"]:
            _TALLY["failed"][kind] += declared
            continue
        _TALLY["handled"][kind] += value["ran"]
        if value["ran"] < declared:
            _TALLY["short"][report.nodeid] = declared - value["ran"]


def pytest_terminal_summary(terminalreporter):
    handled, failed = _TALLY["handled"], _TALLY["failed"]
    if not (handled or failed):
        return
    line = ("reliability: " + " and ".join(f"{handled[k]} {label}" for k, label in
                                           RELIABILITY_KINDS.items()) + " exercised")
    if failed:
        line += ", " + " and ".join(f"{failed[k]} {label}" for k, label in
                                    RELIABILITY_KINDS.items() if failed[k]) + " NOT handled"
    else:
        line += ", all handled"
    if _TALLY["short"]:
        line += (f" (fewer Hypothesis examples ran than declared in "
                 f"{', '.join(sorted(_TALLY['short']))})")
    terminalreporter.write_line(line)


@pytest.fixture(autouse=True)
def _one_thread():
    """Re-apply the thread setting before every test: third-party imports (numba via umap-learn)
    reset the OpenMP thread count that torch shares."""
    torch.set_num_threads(int(os.environ.get("ANCHOR_TEST_THREADS", "1")))

"""scripts/gpu_job.sh: the device session's plumbing, run on the CPU.

Device time comes in rare ten-minute slots, and a slip in the job script would cost one. This runs
the session's tutorial stage on runs prepared here in seconds (training and evaluation themselves
are tested in test_reproduce.py): finished runs are skipped and exported, a committed run whose
weights are missing is removed so that it is trained again, and the small artifacts and the
unfinished runs' resume files are packed for the trip back.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from anchor_lib import checkpoint
from anchor_lib import reproduce as rep

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_job.sh"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished smoke run of `standard` (the config the session's `reproduce --profile smoke
    --data synthetic` asks for), trained once for this module's tests to copy."""
    results = tmp_path_factory.mktemp("finished") / "results"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(rep.EVAL_SETTINGS, "smoke",
                   {"n": 48, "autoattack_n": 16, "sanity": False, "embed_n": 40})
        rep.reproduce("smoke", ("standard",), results, attacks=("clean", "pgd20"),
                      log=lambda _: None, data="synthetic", progress=False)
    return results / "smoke-standard"


def run_session(cwd: Path, timeout: int = 120, **job_env: str) -> tuple[str, Path]:
    """``gpu_job.sh session`` in ``cwd`` with these job variables, as the device machine runs it
    (no decoding of the real data, one thread); returns its job.log and its $OUT."""
    out = cwd / "out"
    env = {**os.environ, "OUT": str(out), "JOB_DECODE": "0", "OMP_NUM_THREADS": "1",
           # the script runs `python3`: make it this interpreter, as it is on the device machine
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           **job_env}
    proc = subprocess.run(["bash", str(SCRIPT), "session"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return (out / "job.log").read_text(), out


def test_session_skips_exports_and_packs_what_came_back(tmp_path, finished_run):
    results = tmp_path / "data" / "results"
    shutil.copytree(finished_run, results / "smoke-standard")
    shutil.copytree(results / "smoke-standard", results / "smoke-anchor")
    (results / "smoke-anchor" / "best.pt").unlink()  # committed without its weights
    unfinished = results / "smoke-pgd_at"
    unfinished.mkdir()
    shutil.copy(results / "smoke-standard" / "checkpoint.pt", unfinished / "checkpoint.pt")

    log, out = run_session(tmp_path, STAGES="tutorial precision", JOB_PROFILE="smoke",
                           JOB_RUNS="standard", JOB_ARGS="--data synthetic", PRECISION_N="64")
    assert "== smoke standard: rc 0" in log and "== export: rc 0" in log, log[-3000:]
    assert "smoke-standard: skipped (finished)" in log
    # The precision stage measures the first finished run with weights (smoke-anchor has none).
    assert "== precision (data/results/smoke-standard): rc 0" in log, log[-3000:]
    precision = json.loads((out / "precision.json").read_text())
    assert precision["n"] == 64 and precision["model"]["method"] == "standard"
    assert set(precision["variants"]) == {
        "fp32", "tf32", "bf16"}
    assert not (results / "smoke-anchor").exists()  # to be trained again, weights and all

    with tarfile.open(out / "results.tgz") as tar:
        names = set(tar.getnames())
    # Only what the job wrote: the skipped run is here already (and the committed results alone
    # would pass the 16 MB a returned file may have).
    assert {"data/checkpoints/standard-w8.pt", "data/checkpoints/manifest.json"} <= names
    assert not [n for n in names if "smoke-standard" in n], names
    assert not [n for n in names if n.endswith(("checkpoint.pt", "best.pt"))], names
    with tarfile.open(out / "resume.tgz") as tar:
        assert tar.getnames() == ["data/results/smoke-pgd_at",
                                  "data/results/smoke-pgd_at/checkpoint.pt"]
    manifest = json.loads((tmp_path / "data/checkpoints/manifest.json").read_text())
    assert [e["method"] for e in manifest["checkpoints"]] == ["standard"]


def test_session_keeps_full_profile_runs_without_weights(tmp_path, finished_run):
    """A committed full-profile run never has its weights on the device (~90 MB, and no tutorial
    checkpoint is made of it), so the session must not remove it to be trained again, as it
    does a tutorial run without them; nor export anything at that profile. The compile cache
    comes back with the results."""
    results = tmp_path / "data" / "results"
    for name in ("full-anchor", "tutorial-anchor"):
        shutil.copytree(finished_run, results / name)
        (results / name / "best.pt").unlink()
    (tmp_path / ".gpu" / "compile-cache").mkdir(parents=True)  # what earlier machines sent back
    (tmp_path / ".gpu" / "compile-cache" / "0123.bin").write_bytes(b"kernels")
    log, out = run_session(tmp_path, timeout=60, STAGES="tutorial", JOB_PROFILE="full",
                           JOB_RUNS="anchor", BUDGET_S="0")  # no time: nothing trains
    assert "== full anchor" not in log and "== export" not in log, log[-3000:]
    assert (results / "full-anchor" / "metrics.json").is_file()
    assert (results / "tutorial-anchor" / "metrics.json").is_file()  # not this profile's run
    with tarfile.open(out / "results.tgz") as tar:
        assert tar.getnames() == []  # nothing new: the kept runs are here already
    with tarfile.open(out / "compile-cache.tgz") as tar:  # goes back with the results
        assert tar.extractfile("compile-cache/0123.bin").read() == b"kernels"


def test_session_starts_only_the_runs_that_fit(tmp_path, finished_run):
    """The session passes what is left of BUDGET_S to reproduce as --time-budget: a run that the
    finished runs say cannot end in time is not started (it would be lost whole)."""
    results = tmp_path / "data" / "results"
    slow = results / "ablation_old" / "slow"  # a finished pgd_at run that took a day per epoch
    shutil.copytree(finished_run, slow)
    metrics = json.loads((slow / "metrics.json").read_text())
    metrics["method"] = metrics["config"]["method"] = "pgd_at"
    # evaluated as the session's run will be: every attack, and the smoke profile's checks
    metrics["accuracy"] = {a: {"value": 0.5, "n": 48} for a in rep.evaluate.ATTACKS}
    metrics["sanity"] = {"more_steps": {"passed": True}}
    checkpoint.write_json(slow / "metrics.json", metrics)
    checkpoint.write_text(slow / "history.csv", "epoch,seconds\n1,86400\n")
    log, out = run_session(tmp_path, STAGES="tutorial", JOB_PROFILE="smoke", JOB_RUNS="pgd_at",
                           JOB_ARGS="--data synthetic", BUDGET_S="300")
    assert "smoke-pgd_at: not started: it needs about 9" in log, log[-3000:]
    assert "== smoke pgd_at: rc 0" in log and not (results / "smoke-pgd_at").exists()


def test_session_then_runs_other_arguments_in_the_time_left(tmp_path, finished_run):
    """JOB_THEN_ARGS: after JOB_RUNS, the same profile once more with other arguments: an
    ablation slot in the same job, its artifacts packed with the rest. JOB_RUNS' run fails here
    (its folder holds another method's finished run, which reproduce refuses to overwrite), and
    the slot after it runs all the same: a failed stage costs none after it."""
    results = tmp_path / "data" / "results"
    shutil.copytree(finished_run, results / "smoke-trades")  # a `standard` run
    log, out = run_session(
        tmp_path, STAGES="tutorial", JOB_PROFILE="smoke", JOB_RUNS="trades",
        JOB_ARGS="--data synthetic",
        # one ablation run: the two-stage value cannot run in the smoke profile's one epoch
        JOB_THEN_ARGS="--ablation --params pretrain_fraction --data synthetic --attacks clean "
                      "--no-sanity")
    assert "== smoke anchor --ablation --params pretrain_fraction" in log, log[-3000:]
    assert "is a finished run with a different config (method" in log, log[-3000:]
    assert log.index("== smoke trades: rc 1") < log.index("== smoke anchor --ablation")
    assert "== export" not in log  # nothing the chapters load has finished
    summary = json.loads((results / "ablation_summary.json").read_text())
    assert summary["params"]["pretrain_fraction"]["chosen"] == "0.0"
    with tarfile.open(out / "results.tgz") as tar:
        names = set(tar.getnames())
    assert "data/results/ablation_pretrain_fraction/pretrain_fraction-0.0/metrics.json" in names
    assert "data/results/ablation_summary.json" in names


def test_background_job_outlives_the_call_and_is_polled(tmp_path, finished_run):
    """`start` runs the session in a copy of the tree, in the background; `poll` brings back
    what has finished so far, then the job's own output once it is done. The session runs its
    methods as parallel processes here (JOB_PARALLEL=1), the test above one after another."""
    repo = tmp_path / "repo"
    shutil.copytree(finished_run, repo / "data" / "results" / "smoke-standard")
    bg = tmp_path / "bg"
    env = {**os.environ, "JOB_BG": str(bg), "STAGES": "tutorial", "JOB_PROFILE": "smoke",
           "JOB_RUNS": "standard", "JOB_ARGS": "--data synthetic", "JOB_DECODE": "0",
           "OMP_NUM_THREADS": "1", "JOB_PARALLEL": "1", "JOB_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}

    def call(*args: str, out: Path, poll_s: int) -> str:
        proc = subprocess.run(["bash", str(SCRIPT), *args], cwd=repo, capture_output=True,
                              text=True, timeout=150,
                              env={**env, "OUT": str(out), "POLL_S": str(poll_s)})
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return proc.stdout

    first = call("start", out=tmp_path / "out1", poll_s=0)
    assert "started session in the background" in first and "still running" in first, first
    with tarfile.open(tmp_path / "out1" / "partial.tgz") as tar:  # the job's own files only
        assert not [n for n in tar.getnames() if "smoke-standard" in n], tar.getnames()
    # The working tree of the next call may differ: the job runs in its own copy.
    assert (bg / "tree" / "data" / "results" / "smoke-standard").is_dir()

    second = call("poll", out=tmp_path / "out2", poll_s=120)
    assert "== background: finished, rc 0" in second, second
    log = (tmp_path / "out2" / "job.log").read_text()
    assert "smoke-standard: skipped (finished)" in log and "== export: rc 0" in log, log[-2000:]
    assert "== smoke standard: rc 0" in log
    with tarfile.open(tmp_path / "out2" / "results.tgz") as tar:
        assert "data/checkpoints/standard-w8.pt" in tar.getnames()
    assert (tmp_path / "out2" / "bg.log").is_file()
    assert not (tmp_path / "out2" / "partial.tgz").exists()  # results.tgz holds it all
    assert second.count("== smoke standard: rc 0") == 1, second  # each summary line once
    # A later call may not see the job's process (its own pid namespace on the device): poll
    # then waits for the job's exit status, not for the pid, and reports it still running.
    other = tmp_path / "other"
    (other / "tree" / "data" / "results").mkdir(parents=True)
    (other / "out").mkdir()
    (other / "pid").write_text("999999999\n")
    (other / "log").write_text("== probe: rc 0 after 25s\n")
    (other / "out" / "job.log").write_text("[pgd_at] epoch 3/30 loss 1.9 train acc 0.3\n")
    (other / "tree" / ".gpu" / "compile-cache").mkdir(parents=True)  # saved after epoch 1
    (other / "tree" / ".gpu" / "compile-cache" / "ab.bin").write_bytes(b"kernels")
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT), "poll"], cwd=repo, capture_output=True, text=True,
                          env={**env, "JOB_BG": str(other), "OUT": str(tmp_path / "out3"),
                               "POLL_S": "3"})
    assert time.monotonic() - t0 >= 3, proc.stdout
    assert "still running after 3 s" in proc.stdout and "epoch 3/30" in proc.stdout, proc.stdout
    assert (tmp_path / "out3" / "job.log").read_text().startswith("[pgd_at] epoch 3/30")
    with tarfile.open(tmp_path / "out3" / "compile-cache.tgz") as tar:  # in case no call follows
        assert tar.extractfile("compile-cache/ab.bin").read() == b"kernels"
    # Nothing is left to poll on a machine that never started one.
    proc = subprocess.run(["bash", str(SCRIPT), "poll"], cwd=repo, capture_output=True, text=True,
                          env={**env, "JOB_BG": str(tmp_path / "none"), "OUT": str(tmp_path)})
    assert proc.returncode == 1 and "no background job" in proc.stderr


def test_a_packed_archive_too_large_to_come_back_is_split(tmp_path, finished_run):
    """A returned file may have 16 MB: an archive over that would be lost whole, so it comes back
    in parts. Files the job did not write (older than its stamp) are not packed at all."""
    stamp = tmp_path / "stamp"
    stamp.touch()
    time.sleep(0.05)
    big = tmp_path / "data" / "results" / "ablation_x" / "run"
    big.mkdir(parents=True)
    (big / "embeddings.npz").write_bytes(os.urandom(17_000_000))  # written "by the job"
    (big / ".checkpoint.pt.1a2b3c4d.tmp").write_bytes(b"a write a kill cut short")  # not packed
    old = tmp_path / "data" / "results" / "committed"
    old.mkdir()
    (old / "metrics.json").write_text("{}")
    os.utime(old / "metrics.json", (0, 0))  # from before the job
    log, out = run_session(tmp_path, STAGES="none", JOB_PROFILE="smoke",
                           JOB_STAMP=str(stamp))
    parts = sorted(out.glob("results.tgz.part*"))
    assert len(parts) == 2 and not (out / "results.tgz").exists(), sorted(out.iterdir())
    assert all(p.stat().st_size <= 16_000_000 for p in parts)
    whole = tmp_path / "whole.tgz"
    whole.write_bytes(b"".join(p.read_bytes() for p in parts))
    with tarfile.open(whole) as tar:
        assert tar.getnames() == ["data/results/ablation_x/run/embeddings.npz"]

"""Two gloo processes under torchrun train like one process with the same global batch."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from anchor_lib import distributed, losses

TORCHRUN = Path(sys.executable).with_name("torchrun")
# Each test launches two processes: under pytest-xdist (make unit, --dist loadgroup) they all run
# on one worker, one after another, so that no more than three processes share the two cores.
pytestmark = pytest.mark.xdist_group("two_processes")
ARGS = ["train", "--method", "standard", "--data", "synthetic", "--profile", "smoke",
        "--epochs", "4", "--width", "4", "--proj-dim", "16", "--batch-size", "64",
        "--train-subset", "1024", "--val-size", "128", "--val-attack-steps", "1", "--lr", "0.1",
        "--quiet"]


def _history(folder: Path) -> list[dict[str, float]]:
    with open(folder / "history.csv") as f:
        return [{k: float(v) if k != "best" else v for k, v in row.items()}
                for row in csv.DictReader(f)]


def _run(*cmds: list[str], cwd: Path) -> list[str]:
    """Run the commands side by side (each single-threaded), require that all succeed, and
    return what each printed on stdout."""
    # torchrun leaves a torchelastic_* folder in TMPDIR each time: keep them in the test's folder.
    scratch = cwd / "tmp"
    scratch.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ANCHOR_OFFLINE": "1", "TMPDIR": str(scratch)}
    procs = [subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for cmd in cmds]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-2000:]
        outs.append(out)
    return outs


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside python")
@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    _run([sys.executable, "-m", "anchor_lib", *ARGS, "--out", str(tmp_path / "one")],
         [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "anchor_lib", *ARGS,
          "--out", str(tmp_path / "two")], cwd=tmp_path)
    one, two = _history(tmp_path / "one"), _history(tmp_path / "two")
    assert len(one) == len(two) == 4
    # Same global batch and step count, so the same learning-rate schedule, step for step.
    assert [r["lr"] for r in one] == pytest.approx([r["lr"] for r in two])
    # Stated tolerance. The processes see other crops than the single run and BatchNorm normalises
    # each half-batch by itself, so mid-training the runs differ by noise (one epoch of this tiny
    # task can swing validation accuracy by 0.6). They must start alike (first-epoch loss within
    # 5%) and end alike: final validation accuracy within 0.05, and final training accuracy within
    # 0.1 (it is averaged over the last epoch while the model still learns: on one CPU the runs
    # ended at 0.997 and 0.945 with the same validation accuracy).
    assert two[0]["loss"] == pytest.approx(one[0]["loss"], rel=0.05), (one[0], two[0])
    assert abs(one[-1]["train_acc"] - two[-1]["train_acc"]) <= 0.1, (one[-1], two[-1])
    assert abs(one[-1]["val_clean"] - two[-1]["val_clean"]) <= 0.05, (one[-1], two[-1])
    assert min(one[-1]["val_clean"], two[-1]["val_clean"]) > 0.8, (one[-1], two[-1])  # both learned


# Run by two gloo processes: the contrastive loss of the gathered rows, its averaged gradient, and
# the trainer's refusal of CUDA graphs with a gathering step. Rank 0 saves what it saw.
_GATHER_SCRIPT = """
import sys
from functools import partial

import torch
import torch.nn.functional as F

from anchor_lib import distributed, losses, train

ctx = distributed.setup(torch.device("cpu"))
x, y, w = torch.load(sys.argv[1])
proj = torch.nn.Linear(8, 5, bias=False)
proj.weight.data.copy_(w)
xs, ys = distributed.shard(x, y, ctx)
gather = partial(distributed.gather_rows, ctx=ctx)
loss = losses.anchor_loss(gather(F.normalize(proj(xs), dim=1)), gather(ys), temperature=0.5,
                          beta=1.0)
loss.backward()
distributed.average_gradients(proj, ctx)
try:
    train.train(train.TrainConfig(method="anchor", data="synthetic", width=4, proj_dim=8,
                                  batch_size=16, train_subset=32, val_size=0, device="cpu",
                                  cuda_graphs=True, progress=False))
    refusal = None
except ValueError as err:
    refusal = str(err)
if ctx.main:
    torch.save({"loss": loss.detach(), "grad": proj.weight.grad, "refusal": refusal}, sys.argv[2])
distributed.teardown()
"""


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside python")
def test_gathered_contrastive_term_has_the_one_process_loss_and_gradient(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 8, generator=g), torch.randint(0, 3, (24,), generator=g)
    w = torch.randn(5, 8, generator=g)
    torch.save((x, y, w), tmp_path / "inputs.pt")
    (tmp_path / "gather.py").write_text(textwrap.dedent(_GATHER_SCRIPT))
    _run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", str(tmp_path / "gather.py"),
          str(tmp_path / "inputs.pt"), str(tmp_path / "seen.pt")], cwd=tmp_path)
    seen = torch.load(tmp_path / "seen.pt")

    w1 = w.clone().requires_grad_()
    one = losses.anchor_loss(F.normalize(x @ w1.T, dim=1), y, temperature=0.5, beta=1.0)
    one.backward()
    # Rows arrive in another order (rank 0's, then rank 1's); the loss does not depend on it.
    assert seen["loss"].item() == pytest.approx(one.item(), rel=1e-5)
    torch.testing.assert_close(seen["grad"], w1.grad, rtol=1e-4, atol=1e-6)
    assert "cuda_graphs=True cannot be combined with 2 processes" in seen["refusal"]


def test_gather_rows_is_the_identity_for_one_process():
    t = torch.randn(3, 2, requires_grad=True)
    assert distributed.gather_rows(t, distributed.Context(0, 1, torch.device("cpu"))) is t


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside python")
def test_two_process_anchor_sees_the_global_batchs_contrastive_term(tmp_path):
    # With a learning rate of 1e-6 the weights stay put, so the epoch's mean contrastive loss is
    # that of the initial model on 3 x 64 views per step. Gathering makes the two-process term
    # the same; without it each process would see 96 views, about log 2 = 0.69 lower (4.5
    # instead of 5.2 here).
    args = ["train", "--method", "anchor", "--data", "synthetic", "--profile", "smoke",
            "--epochs", "1", "--width", "4", "--proj-dim", "16", "--batch-size", "64",
            "--train-subset", "256", "--val-size", "0", "--lr", "1e-6", "--quiet"]
    printed = _run([sys.executable, "-m", "anchor_lib", *args, "--out", str(tmp_path / "one")],
                   [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "anchor_lib", *args,
                    "--out", str(tmp_path / "two")], cwd=tmp_path)
    one, two = _history(tmp_path / "one")[0], _history(tmp_path / "two")[0]
    assert two["con"] == pytest.approx(one["con"], rel=0.01), (one, two)
    # The summary: printed once (by rank 0 only, under torchrun), as strict JSON although
    # --val-size 0 leaves the validation accuracies NaN.
    for out in printed:
        [line] = [line for line in out.splitlines() if line.startswith("{")]
        summary = json.loads(line, parse_constant=lambda name, text=line: pytest.fail(
            f"{name} in {text}"))
        assert summary["epochs"] == 1 and summary["last"]["val_clean"] is None


def test_shards_are_disjoint_equal_and_trimmed():
    """Every rank takes every world-th example and the same count (DDP's all-reduces need equal
    step counts), so an indivisible remainder is left out."""
    x, y = torch.arange(10).reshape(5, 2), torch.arange(5)
    parts = [distributed.shard(x, y, distributed.Context(r, 2, torch.device("cpu"))) for r in (0, 1)]
    assert [p[1].tolist() for p in parts] == [[0, 2], [1, 3]]
    assert torch.equal(parts[1][0], x[[1, 3]])
    three = [distributed.shard(x, y, distributed.Context(r, 3, torch.device("cpu")))[1].tolist()
             for r in range(3)]
    assert three == [[0], [1], [2]]
    one = distributed.shard(x, y, distributed.Context(0, 1, torch.device("cpu")))
    assert torch.equal(one[0], x) and torch.equal(one[1], y)


def test_teardown_waits_for_the_others_unless_told_not_to(monkeypatch):
    calls = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: calls.append("destroy"))
    distributed.teardown()
    assert calls == ["barrier", "destroy"]
    calls.clear()
    distributed.teardown(wait=False)  # after an error the others may never arrive
    assert calls == ["destroy"]
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    calls.clear()
    distributed.teardown()
    assert calls == []


def test_context_is_frozen():
    ctx = distributed.Context(1, 2, torch.device("cpu"))
    assert not ctx.main and distributed.Context(0, 2, torch.device("cpu")).main
    with pytest.raises(AttributeError):
        ctx.rank = 0  # a rank that changed mid-run would write rank 0's files twice


@pytest.mark.parametrize("world", [1, 2, 3])
def test_collectives_reach_the_group_exactly_when_there_is_one(world, monkeypatch):
    """With one process every helper is a no-op (no group exists to call); with two or more each
    is one collective: a NaN on one rank must stop every rank (all_max), and every rank must wait
    for rank 0's checkpoint (barrier)."""
    calls = []
    monkeypatch.setattr(distributed.dist, "all_reduce",
                        lambda t, op=distributed.dist.ReduceOp.SUM: calls.append(("all_reduce", op)))
    monkeypatch.setattr(distributed.dist, "barrier", lambda: calls.append(("barrier", None)))
    ctx = distributed.Context(0, world, torch.device("cpu"))
    t = torch.tensor([3.0])
    assert distributed.all_sum(t, ctx) is t and distributed.all_max(t, ctx) is t
    distributed.barrier(ctx)
    if world == 1:
        assert calls == []
    else:
        assert calls == [("all_reduce", distributed.dist.ReduceOp.SUM),
                         ("all_reduce", distributed.dist.ReduceOp.MAX), ("barrier", None)]

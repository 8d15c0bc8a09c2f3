"""anchor_lib.graphs: the CUDA-graph step's static-buffer path, checked on the CPU (the rehearsal).

The recording itself needs a GPU (``benchmarks/gpu_probe.py`` and the benchmark compare it with
the eager step there); everything around it — static inputs, warm-up, putting the model's state
back, the first-step comparison and the fallback — runs here.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

from anchor_lib import checkpoint, data, graphs, train
from anchor_lib.train import METHODS, TrainConfig, build_model, draw_step_inputs, step_loss


def tiny(method: str = "standard", **overrides) -> TrainConfig:
    base = dict(method=method, data="synthetic", width=4, proj_dim=16, epochs=1, batch_size=32,
                lr=0.05, train_subset=128, val_size=64, attack_steps=2, val_attack_steps=2,
                progress=False, log_every=2, device="cpu")
    return TrainConfig(**{**base, **overrides})


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", METHODS)
def test_rehearsal_matches_eager_bit_for_bit(method):
    """Three optimiser steps: same losses, gradients, weights and BatchNorm statistics."""
    cfg = tiny(method)
    torch.manual_seed(0)
    init = build_model(cfg).state_dict()
    x = torch.randint(0, 256, (3, 32, 3, 16, 16), dtype=torch.uint8)
    y = torch.randint(0, 10, (3, 32))
    runs = {}
    for graph in (False, True):
        model = build_model(cfg)
        model.load_state_dict(init)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
        step = graphs.StepGraph(model, partial(step_loss, model, cfg, False), graph=graph)
        gen = torch.Generator().manual_seed(1)
        torch.manual_seed(2)
        record = []
        for i in range(3):
            loss, parts = step(y=y[i], **draw_step_inputs(cfg, x[i], gen))
            record.append((loss.item(), {k: v.item() for k, v in parts.items()},
                           [None if p.grad is None else p.grad.clone() for p in model.parameters()]))
            opt.step()
        runs[graph] = (record, _state(model), step.mode)
    assert runs[False][2] == "eager" and runs[True][2] == "rehearsal"
    for (la, pa, ga), (lb, pb, gb) in zip(runs[False][0], runs[True][0], strict=True):
        assert la == lb and pa == pb
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(ga, gb, strict=True))
    assert all(torch.equal(runs[False][1][k], runs[True][1][k]) for k in runs[False][1])


def test_warmup_leaves_batchnorm_statistics_as_one_step_would():
    """The warm-up runs update running statistics; they must be put back before the real step."""
    cfg = tiny("pgd_at")
    torch.manual_seed(0)
    model = build_model(cfg)
    before = _state(model)
    inputs = draw_step_inputs(cfg, torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8),
                              torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (32,))
    graphs.StepGraph(model, partial(step_loss, model, cfg, False), graph=True, warmup=4)(
        y=y, **inputs)
    after_graph = _state(model)
    model.load_state_dict(before)
    graphs.StepGraph(model, partial(step_loss, model, cfg, False), graph=False)(y=y, **inputs)
    assert after_graph["bn.num_batches_tracked"].item() == before["bn.num_batches_tracked"].item() + 1
    assert all(torch.equal(after_graph[k], v) for k, v in _state(model).items())


def test_a_step_that_differs_on_replay_falls_back_to_eager():
    """A body that is not a function of its inputs (here: a call counter) cannot be replayed."""
    model = torch.nn.Linear(4, 2)
    calls = []

    def body(x):
        calls.append(1)
        loss = model(x).sum() * len(calls)
        return loss, {"loss": loss.detach()}

    messages = []
    step = graphs.StepGraph(model, body, graph=True, warmup=2, log=messages.append)
    x = torch.ones(3, 4)
    loss, _ = step(x=x)
    assert step.mode == "eager" and "differs from the eager step" in step.fallback
    assert messages and "CUDA graph dropped" in messages[0]
    # The step that was returned is an eager step from the restored state.
    assert loss.item() == pytest.approx(model(x).sum().item() * len(calls))
    step(x=x)
    assert step.mode == "eager"


def test_a_body_that_raises_while_recording_falls_back():
    model = torch.nn.Linear(4, 2)
    state = {"n": 0}

    def body(x):
        state["n"] += 1
        if state["n"] == 2:  # the "recording" (the rehearsal's first static run after warm-up)
            raise RuntimeError("operation not permitted when stream is capturing")
        loss = model(x).pow(2).sum()
        return loss, {}

    messages = []
    step = graphs.StepGraph(model, body, graph=True, warmup=1, log=messages.append)
    loss, _ = step(x=torch.ones(2, 4))
    assert step.mode == "eager" and "stream is capturing" in step.fallback
    assert all(p.grad is not None for p in model.parameters())
    assert torch.isfinite(loss)


def test_trainer_with_the_rehearsal_trains_exactly_as_eager(monkeypatch, tmp_path):
    """train() through the static-buffer path gives the same history and weights as eager."""
    ds = data.synthetic(n_train=512, n_test=64, size=16, noise=0.1, seed=0)
    cfg = dict(method="anchor", epochs=2, train_subset=128)
    eager = train.train(tiny(**cfg, out_dir=str(tmp_path / "eager")), dataset=ds)
    real = graphs.StepGraph
    monkeypatch.setattr(train.graphs, "StepGraph",
                        lambda *a, graph, **k: real(*a, graph=True, **k))
    rehearsed = train.train(tiny(**cfg, out_dir=str(tmp_path / "graph")), dataset=ds)
    keys = ("loss", "ce", "con", "train_acc", "val_clean", "val_pgd")
    assert [[r[k] for k in keys] for r in eager] == [[r[k] for k in keys] for r in rehearsed]
    a = checkpoint.load(tmp_path / "eager" / "checkpoint.pt")
    b = checkpoint.load(tmp_path / "graph" / "checkpoint.pt")
    assert (a["train_step"], b["train_step"]) == ("eager", "rehearsal")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.bad_input
def test_a_recorded_step_refuses_inputs_of_another_shape():
    model = torch.nn.Linear(4, 2)
    step = graphs.StepGraph(model, lambda x: (model(x).sum(), {}), graph=True)
    step(x=torch.ones(8, 4))
    step(x=torch.zeros(8, 4))
    with pytest.raises(ValueError, match=r"shapes it was recorded with, \{'x': \(8, 4\)\}; "
                                         r"got \{'x': \(5, 4\)\}"):
        step(x=torch.ones(5, 4))


@pytest.mark.bad_input
def test_cuda_graphs_on_a_cpu_is_refused():
    with pytest.raises(ValueError, match="cuda_graphs=True needs a CUDA device, got cpu"):
        train.train(tiny("standard", cuda_graphs=True))


@pytest.mark.bad_input
@pytest.mark.parametrize("bad", ["yes", 1])
def test_cuda_graphs_must_be_a_bool_or_none(bad):
    with pytest.raises(ValueError, match="cuda_graphs must be True or False or None"):
        tiny("standard", cuda_graphs=bad)


def _params(*grads):
    """Parameters whose ``.grad`` are ``grads`` (None: no gradient)."""
    out = []
    for g in grads:
        p = torch.zeros(1 if g is None else g.shape, requires_grad=True)
        p.grad = None if g is None else g.clone()
        out.append(p)
    return out


def test_compare_accepts_the_same_step_and_small_relative_differences():
    g = [torch.tensor([3.0, -4.0]), torch.tensor([12.0])]  # one vector of norm 13
    same = graphs._compare(torch.tensor(-2.5), _params(*g), torch.tensor(-2.5), g)
    assert same is None
    # A loss of 100 off by 0.5, and a gradient off by 0.05 in norm 13: both relative, both inside.
    near = [torch.tensor([3.05, -4.0]), torch.tensor([12.0])]
    assert graphs._compare(torch.tensor(100.5), _params(*near), torch.tensor(100.0), g) is None
    assert graphs._compare(torch.tensor(99.5), _params(*g), torch.tensor(100.0), g) is None
    assert graphs._compare(torch.tensor(-100.5), _params(*g), torch.tensor(-100.0), g) is None
    # A small tensor far off relative to itself is not another step when the whole vector agrees
    # (an attack's sign step flipping a pixel moves one BatchNorm bias).
    big = [torch.full((1000,), 1.0), torch.tensor([1e-3])]
    tiny_off = [big[0], torch.tensor([2e-3])]
    assert graphs._compare(torch.tensor(1.0), _params(*tiny_off), torch.tensor(1.0), big) is None


@pytest.mark.parametrize("loss, ref", [(1.02, 1.0), (-1.02, -1.0), (0.5, 0.52), (1e-3, 2e-3)])
def test_compare_refuses_a_loss_off_by_more_than_the_tolerance(loss, ref):
    g = [torch.ones(3)]
    problem = graphs._compare(torch.tensor(loss), _params(*g), torch.tensor(ref), g)
    assert problem is not None and "differs from the eager step" in problem
    assert f"tolerance {graphs.TOLERANCE}" in problem


def test_compare_refuses_gradients_off_when_the_loss_agrees():
    want = [torch.tensor([3.0, 4.0]), torch.tensor([0.0])]
    got = [torch.tensor([3.0, 4.2]), torch.tensor([0.0])]  # 0.2 / 5 = 4 % off
    problem = graphs._compare(torch.tensor(1.0), _params(*got), torch.tensor(1.0), want)
    assert problem is not None and problem.startswith("the first replay differs from the eager "
                                                      "step by 0.04 ")


@pytest.mark.parametrize("loss", [float("nan"), float("inf")])
def test_compare_refuses_a_non_finite_replay(loss):
    g = [torch.ones(2)]
    assert graphs._compare(torch.tensor(loss), _params(*g), torch.tensor(1.0), g) is not None
    nan_grad = [torch.tensor([1.0, float("nan")])]
    assert graphs._compare(torch.tensor(1.0), _params(*nan_grad), torch.tensor(1.0), g) is not None


def test_compare_refuses_a_replay_that_leaves_other_parameters_without_gradients():
    g = [torch.ones(2), torch.ones(2), torch.ones(2)]
    for missing in ([None, g[1], g[2]], [g[0], g[1], None]):  # one of several is enough
        problem = graphs._compare(torch.tensor(1.0), _params(*missing), torch.tensor(1.0), g)
        assert problem == "the replay left different parameters without a gradient than the eager step"
    extra = graphs._compare(torch.tensor(1.0), _params(*g), torch.tensor(1.0), [None, g[1], g[2]])
    assert extra is not None and "without a gradient" in extra
    # Parameters without a gradient in both runs (a frozen stage) are simply left out.
    assert graphs._compare(torch.tensor(1.0), _params(None, g[1]), torch.tensor(1.0),
                           [None, g[1]]) is None


def test_warmup_runs_the_body_that_many_times_before_the_rehearsal():
    model = torch.nn.Linear(4, 2)
    calls = []

    def body(x):
        calls.append(1)
        return model(x).sum(), {}

    for warmup, expected in ((2, 3), (5, 6), (0, 2)):  # at least one warm-up run, then the step
        calls.clear()
        graphs.StepGraph(model, body, graph=True, warmup=warmup)(x=torch.ones(2, 4))
        assert len(calls) == expected

"""No host synchronisation inside a training step (issue 4's lever, and what a CUDA graph needs).

A GPU step that waits for the host (``.item()``, ``bool(t)``, a data-dependent shape such as
``nonzero``) stalls the launch queue, and inside a CUDA-graph capture it is an error, so the
trainer falls back to eager steps on the GPU. A CPU run never waits, so neither slowness nor a
capture error shows here; these tests see the operators themselves: the aten operators of
:data:`SYNCING` (scalar reads and data-dependent shapes) go through PyTorch's dispatcher, where a
``TorchDispatchMode`` counts them, and the Python-level reads (``tolist``, ``numpy``, ``cpu``) are
counted by wrapping those methods. What a CPU cannot show: a copy to the host written another way
(``.to("cpu")`` is no copy at all for a CPU tensor), or a sync inside a kernel of its own.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from anchor_lib import data, graphs, train
from anchor_lib.train import CONTRASTIVE_METHODS, METHODS, TrainConfig

#: aten operators that read a device value on the host: a scalar read, or an output whose
#: shape depends on the data.
SYNCING = frozenset({"_local_scalar_dense", "is_nonzero", "equal", "nonzero", "nonzero_static",
                     "masked_select", "unique", "_unique", "_unique2", "unique_dim",
                     "unique_consecutive", "bincount", "histc", "_assert_async"})
#: Syncing unless told their output's size.
SIZED = frozenset({"repeat_interleave"})


class HostSyncs(TorchDispatchMode):
    """Names of the syncing operators dispatched inside the block, in order, plus the
    Python-level reads of tensor data (``tolist``, ``numpy``) made while it was active."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__()
        self.calls: list[str] = []
        for name in ("tolist", "numpy", "cpu"):
            original = getattr(torch.Tensor, name)

            def counted(t, *args, _original=original, _name=name, **kwargs):
                if self.active:
                    self.calls.append(_name)
                return _original(t, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)
        self.active = False

    def __enter__(self):
        self.active = True
        return super().__enter__()

    def __exit__(self, *exc):
        self.active = False
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNCING or (name in SIZED and (kwargs or {}).get("output_size") is None):
            self.calls.append(name)
        elif name in ("index", "index_put", "index_put_", "_index_put_impl_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] or ()):
            self.calls.append(f"{name} with a boolean mask")  # its kernel calls nonzero()
        return func(*args, **(kwargs or {}))


def tiny(method: str, **overrides) -> TrainConfig:
    base = dict(method=method, data="synthetic", width=4, proj_dim=8, epochs=1, batch_size=32,
                lr=0.05, train_subset=64, val_size=0, attack_steps=2, val_attack_steps=2,
                progress=False, device="cpu")
    return TrainConfig(**{**base, **overrides})


def test_the_counter_sees_each_kind_of_host_read(monkeypatch):
    """The counter is not blind: every kind of read the step must avoid is counted."""
    t = torch.tensor([0.5, -1.0])
    with HostSyncs(monkeypatch) as syncs:
        t.sum().item()
        bool(t[0] > 0)
        t[t > 0]  # a boolean mask: the result's length depends on the data
        t.nonzero()
        t.tolist()
        t.numpy()
        torch.equal(t, t)
        t[t > 0] = 0.0
        torch.repeat_interleave(torch.tensor([1, 2]))
        t.cpu()
    assert syncs.calls == ["_local_scalar_dense", "_local_scalar_dense", "index with a boolean mask",
                           "nonzero", "tolist", "numpy", "equal", "index_put_ with a boolean mask",
                           "repeat_interleave", "cpu"]


STEPS = [(m, "joint", {}) for m in METHODS] + [
    ("anchor", "joint", {"adv_in_contrastive": False}),
    ("trades", "joint", {"attack_bn": "train"}),
    ("anchor", "pretrain", {"pretrain_fraction": 0.5, "epochs": 2}),
    ("anchor", "pretrain", {"pretrain_fraction": 0.5, "epochs": 2, "adv_in_contrastive": False}),
    ("anchor", "probe", {"pretrain_fraction": 0.5, "epochs": 2}),
]


@pytest.mark.parametrize("method, stage, overrides", STEPS,
                         ids=["-".join([m, s, *(f"{k}={v}" for k, v in o.items())])
                              for m, s, o in STEPS])
def test_a_training_step_never_waits_for_the_device(method, stage, overrides, monkeypatch):
    """Each method's and stage's step, as the trainer runs it: the random draws, the step's
    forward and backward (what a CUDA graph records) and the optimiser's update."""
    cfg = tiny(method, **overrides)
    model = train.build_model(cfg)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (cfg.batch_size, 3, 16, 16), dtype=torch.uint8, generator=gen)
    y = torch.arange(cfg.batch_size) % 10
    body = partial(train.step_loss, model, cfg, False, stage=stage)
    step = graphs.StepGraph(model, body, graph=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    with HostSyncs(monkeypatch) as syncs:
        for _ in range(2):
            inputs = train.draw_step_inputs(cfg, x, gen)
            loss, parts = step(y=y, **inputs)
            optimizer.step()
    assert syncs.calls == [], f"{method} {stage} step reads device values on the host: {syncs.calls}"
    assert torch.isfinite(loss) and set(parts) == {"ce", "con", "correct"}
    if method in CONTRASTIVE_METHODS and stage != "probe":
        assert parts["con"] > 0  # the contrastive term did run


@pytest.mark.parametrize("method", ["pgd_at", "anchor"])
def test_an_epochs_host_syncs_do_not_grow_with_its_steps(method, monkeypatch):
    """The training loop reads device values only every ``log_every`` steps and at the epoch's
    end: with ``log_every`` beyond the epoch, twice the steps make no more reads; with
    ``log_every=1``, every step makes one (so the count can see a read per step)."""
    dataset = data.synthetic(n_train=256, n_test=32, size=16, noise=0.1, seed=0)

    def count(steps: int, log_every: int) -> int:
        cfg = tiny(method, train_subset=steps * 32, log_every=log_every)
        with HostSyncs(monkeypatch) as syncs:
            train.train(cfg, dataset=dataset)
        return len(syncs.calls)

    count(2, log_every=100)  # the data's fingerprint is computed once, at the first run
    assert count(4, log_every=100) == count(2, log_every=100)
    assert count(4, log_every=1) > count(2, log_every=1)

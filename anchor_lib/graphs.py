"""One training step's forward and backward, run eagerly or replayed from a CUDA graph.

Why: a narrow network's PGD-10 step is thousands of small kernels, and launching them from
Python costs more than running them. On an H100 a width-16 step took 107 ms eagerly and 28 ms
replayed from one CUDA graph, with the identical loss (``data/results/bench/gpu_probe-*.json``).

How (the whole-network recipe of PyTorch's CUDA-graph notes): the step's random draws are made
eagerly and copied into static input tensors; the attack, the forward and ``backward()`` are
recorded once; every later step copies its inputs in and replays. The optimiser step stays
outside the graph (its learning rate changes every step), reading the ``.grad`` tensors that the
graph rewrites in place. Before the recording, a few eager warm-up runs let cuDNN pick its
kernels; they change BatchNorm's running statistics, so the model's state is put back afterwards,
and the first replay is checked against an eager run of the same step: if the loss or the
gradients differ, the graph is dropped and training goes on eagerly, saying so.

On a CPU there is no graph to record; ``graph=True`` there runs the same static-buffer path with
the body called eagerly (a "rehearsal"), so the CPU tests cover everything but the recording.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import nn

StepBody = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]

#: Largest relative difference between the first replay and the eager run of the same step that
#: still counts as "the same step": bf16 kernels may sum in another order, a wrong graph is off by
#: orders of magnitude more.
TOLERANCE = 1e-2


class StepGraph:
    """``body(**inputs)`` and its backward, eager or from a CUDA graph.

    Args:
        model: the module whose parameters receive gradients.
        body: ``body(**inputs) -> (loss, parts)``: a scalar loss and a dict of detached device
            tensors. It must not draw random numbers, sync with the host or create tensors whose
            shape depends on data (see :func:`anchor_lib.train.step_loss`).
        graph: record and replay a CUDA graph (on a CPU: the rehearsal, see the module notes).
        warmup: eager runs before the recording.
        log: where the fallback message goes.

    After each call every parameter's ``.grad`` holds that step's gradient (never accumulated);
    the returned tensors are valid until the next call. ``mode`` says how the last step ran:
    ``"eager"``, ``"cuda_graph"`` or ``"rehearsal"``; ``fallback`` says why a graph was dropped.
    """

    def __init__(self, model: nn.Module, body: StepBody, *, graph: bool, warmup: int = 3,
                 log: Callable[[str], None] = print) -> None:
        self.model, self.body, self.warmup, self.log = model, body, warmup, log
        self.mode = "eager" if not graph else None  # decided at the first call
        self.fallback: str | None = None
        self._static: dict[str, torch.Tensor] = {}
        self._out: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None
        self._graph = None
        self._grads: list[torch.Tensor | None] = []
        self._params = [p for p in model.parameters() if p.requires_grad]

    def __call__(self, **inputs: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.mode == "eager":
            return self._eager(inputs)
        if self.mode is None:
            return self._record(inputs)
        shapes = {k: tuple(v.shape) for k, v in inputs.items()}
        recorded = {k: tuple(v.shape) for k, v in self._static.items()}
        if shapes != recorded:  # copy_ would broadcast a smaller batch without a word
            raise ValueError(f"a recorded step takes inputs of the shapes it was recorded with, "
                             f"{recorded}; got {shapes}")
        for name, value in inputs.items():
            self._static[name].copy_(value)
        if self.mode == "cuda_graph":
            self._graph.replay()
            for p, g in zip(self._params, self._grads, strict=True):
                p.grad = g  # the graph's gradient tensors, even if someone set .grad to None
            return self._out
        return self._eager(self._static)  # the rehearsal: the graph's body, run eagerly

    def _eager(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        for p in self._params:
            p.grad = None
        loss, parts = self.body(**inputs)
        loss.backward()
        return loss, parts

    def _record(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Warm up, record, replay once and compare with an eager run of the same step."""
        cuda = next(iter(inputs.values())).is_cuda
        self._static = {name: value.clone() for name, value in inputs.items()}
        saved = _snapshot(self.model)
        try:
            side = torch.cuda.Stream() if cuda else None
            if cuda:
                side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side) if cuda else nullcontext():
                for _ in range(max(1, self.warmup)):
                    _restore(self.model, saved)
                    ref_loss, _ = self._eager(self._static)
            if cuda:
                torch.cuda.current_stream().wait_stream(side)
            reference = (ref_loss.detach().clone(), [_grad_copy(p) for p in self._params])
            _restore(self.model, saved)
            for p in self._params:  # .grad is then allocated in, and rewritten by, the graph
                p.grad = None
            if cuda:
                self._graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self._graph):
                    self._out = self.body(**self._static)
                    self._out[0].backward()
                self._graph.replay()
                self._grads = [p.grad for p in self._params]
                out, self.mode = self._out, "cuda_graph"
            else:
                out, self.mode = self._eager(self._static), "rehearsal"
            problem = _compare(out[0], self._params, *reference)
        except RuntimeError as err:  # a body the graph cannot hold: say so, go on eagerly
            problem = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        if problem is None:
            return out
        self.mode, self.fallback, self._graph, self._out = "eager", problem, None, None
        self.log(f"CUDA graph dropped, training eagerly: {problem}")
        _restore(self.model, saved)
        return self._eager(inputs)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def _restore(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    # In place: the graph holds these tensors' addresses.
    with torch.no_grad():
        for k, v in model.state_dict(keep_vars=True).items():
            v.copy_(saved[k])


def _grad_copy(p: torch.Tensor) -> torch.Tensor | None:
    return None if p.grad is None else p.grad.detach().clone()


def _compare(loss: torch.Tensor, params: list[torch.Tensor], ref_loss: torch.Tensor,
             ref_grads: list[torch.Tensor | None]) -> str | None:
    """None when the replayed step matches the eager one; else what differs (one host sync).

    Gradients are compared as one vector: a single small tensor (a BatchNorm bias) may differ
    relatively more when the attack's sign steps flip a pixel, which does not make it another step.
    """
    if any((p.grad is None) != (g is None) for p, g in zip(params, ref_grads, strict=True)):
        return "the replay left different parameters without a gradient than the eager step"
    pairs = [(p.grad, g) for p, g in zip(params, ref_grads, strict=True) if g is not None]
    diffs = [((loss.detach().float() - ref_loss.float()).abs()
              / ref_loss.float().abs().clamp(min=1e-12))]
    if pairs:
        got = torch.cat([a.detach().float().reshape(-1) for a, _ in pairs])
        want = torch.cat([b.float().reshape(-1) for _, b in pairs])
        diffs.append((got - want).norm() / want.norm().clamp(min=1e-12))
    worst = torch.stack(diffs).max().item()
    if not worst <= TOLERANCE:  # also catches NaN
        return (f"the first replay differs from the eager step by {worst:.3g} (relative; "
                f"tolerance {TOLERANCE})")
    return None

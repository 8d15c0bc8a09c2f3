"""Data-parallel training across processes, with nothing hidden (``torchrun --nproc_per_node=N``).

Each process holds its shard of the training set on its own device and computes the loss of its
``batch_size / N`` slice of every global batch; after ``backward`` the gradients are averaged with
one all-reduce, so every process takes the same optimiser step from the same weights — the global
batch's step. The contrastive term of ``supcon_at`` / ``anchor`` is global too: each process
gathers every process's embeddings (:func:`gather_rows`), so positives, negatives and the mining
weights come from every view of the global batch, as with one process. Two exceptions remain:
BatchNorm normalises each slice by its own statistics (running averages are averaged once an
epoch), and the two-stage variant's pre-training attack climbs the contrastive loss of its own
process's slice (its adversarial embeddings change at every attack step; gathering them would
cost an all-gather per step). NCCL on GPUs, gloo on CPUs. With one process every function here
is a no-op, so the single-process trainer pays nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Context:
    """Where this process stands: ``rank`` in ``[0, world)`` and the device it trains on."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Rank 0 writes checkpoints, artifacts and progress bars."""
        return self.rank == 0


def setup(device: torch.device) -> Context:
    """Join the process group that ``torchrun`` describes in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context(0, 1, device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank()
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    return Context(rank, world, device)


def shard(x: torch.Tensor, y: torch.Tensor, ctx: Context) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's equal-sized share of ``(x, y)`` (every world-th example, trimmed)."""
    n = x.shape[0] // ctx.world
    return x[ctx.rank::ctx.world][:n], y[ctx.rank::ctx.world][:n]


class _GatherRows(torch.autograd.Function):
    """``all_gather`` along dim 0 whose backward returns each process the gradient of its rows,
    summed over processes (every process's loss may depend on every row)."""

    @staticmethod
    def forward(fctx, t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
        fctx.rank, fctx.world = rank, world
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(fctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()  # all_reduce works in place; autograd owns grad
        dist.all_reduce(grad)
        return grad.chunk(fctx.world)[fctx.rank], None, None


def gather_rows(t: torch.Tensor, ctx: Context) -> torch.Tensor:
    """Every process's ``t`` (same shape everywhere), concatenated along dim 0 in rank order.

    ``(n, ...)`` in, ``(world * n, ...)`` out, differentiable: when every process computes the
    same loss of the gathered rows, the gradient that reaches this process's ``t`` is ``world``
    times that loss's gradient, which :func:`average_gradients` divides back, so the step is the
    one-process step on the whole batch. Integer tensors (labels) are gathered without a graph.
    """
    if ctx.world == 1:
        return t
    if not t.requires_grad:
        parts = [torch.empty_like(t) for _ in range(ctx.world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)
    return _GatherRows.apply(t, ctx.rank, ctx.world)


def average_gradients(model: nn.Module, ctx: Context) -> None:
    """Average ``.grad`` over processes in one flat all-reduce."""
    if ctx.world == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= ctx.world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def average_buffers(model: nn.Module, ctx: Context) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over processes."""
    if ctx.world == 1:
        return
    for buf in model.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf)
            buf /= ctx.world


def all_sum(t: torch.Tensor, ctx: Context) -> torch.Tensor:
    """Sum of ``t`` over processes (in place; returns ``t``)."""
    if ctx.world > 1:
        dist.all_reduce(t)
    return t


def all_max(t: torch.Tensor, ctx: Context) -> torch.Tensor:
    """Maximum of ``t`` over processes (in place; returns ``t``)."""
    if ctx.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def barrier(ctx: Context) -> None:
    """Wait for every process (e.g. until rank 0 has written a checkpoint)."""
    if ctx.world > 1:
        dist.barrier()


def is_main_process() -> bool:
    """True unless this process is in a process group at a rank other than 0 (so that what is
    said once, e.g. the command line's summary, is said by rank 0 only)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def teardown(wait: bool = True) -> None:
    """Leave the process group, if this process joined one: wait for every process (unless
    ``wait`` is False: after an error the others may never arrive), then destroy it. Call it at
    the end of a torchrun script (the command line does): a process that exits with the group
    alive can abort in gloo's threads ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()

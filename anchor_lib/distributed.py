"""Data-parallel training across processes, with nothing hidden (``torchrun --nproc_per_node=N``).

Each process holds its shard of the training set on its own device and computes the loss of its
``batch_size / N`` slice of every global batch; after ``backward`` the gradients are averaged with
one all-reduce, so every process takes the same optimiser step from the same weights — the global
batch's step, with two exceptions: BatchNorm normalises each slice by its own statistics (running
averages are averaged once an epoch), and for ``supcon_at`` / ``anchor`` the contrastive term of
each process sees only its slice's views as positives and negatives (no embeddings are gathered
across processes), so N processes average N smaller contrastive problems. NCCL on GPUs, gloo on
CPUs. With one process every function here is a no-op, so the single-process trainer pays nothing.
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

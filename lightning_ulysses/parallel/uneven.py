"""An all-gather of shares of different sizes, differentiable: :func:`gather_shares`.

:func:`~.comm.gather_sequence_grad` gathers equal chunks. Work split by items (the images of a batch
under ``vision_sp``) gives each SP rank a share of its own size, possibly empty; collectives want
equal buffers, so each share travels padded to the largest one and the padding is dropped on arrival.
The backward is the adjoint: every rank's upstream gradient of the whole result is summed over the
group and each rank keeps the part of its own share (a reduce-scatter).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup


class _GatherShares(torch.autograd.Function):
    """Forward: padded all-gather of 1-D shares. Backward: sum over the group, keep this rank's share."""

    @staticmethod
    def forward(ctx, x: Tensor, sizes: tuple[int, ...], group: ProcessGroup) -> Tensor:  # type: ignore[override]
        rank = dist.get_rank(group)
        ctx.group, ctx.sizes, ctx.rank = group, sizes, rank
        width = max(sizes)
        send = x.new_zeros(width)
        send[: sizes[rank]] = x
        received = [torch.empty_like(send) for _ in sizes]
        dist.all_gather(received, send, group=group)
        return torch.cat([r[:n] for r, n in zip(received, sizes)])

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        sizes, width = ctx.sizes, max(ctx.sizes)
        padded = grad.new_zeros(len(sizes), width)
        for row, part in zip(padded, grad.contiguous().split(list(sizes))):
            row[: part.numel()] = part
        # Summed, not averaged: every SP rank carries the whole loss's gradient at the sp x scale of
        # docs/sp-loss.md, which DDP's 1/(dp*sp) average turns into the non-SP gradient.
        if dist.get_backend(ctx.group) == "gloo":  # gloo has no reduce-scatter
            dist.all_reduce(padded, op=dist.ReduceOp.SUM, group=ctx.group)
            mine = padded[ctx.rank]
        else:
            mine = padded.new_empty(width)
            dist.reduce_scatter_tensor(mine, padded.reshape(-1), op=dist.ReduceOp.SUM, group=ctx.group)
        return mine[: sizes[ctx.rank]].clone(), None, None


def gather_shares(x: Tensor, sizes: Sequence[int], group: ProcessGroup) -> Tensor:
    """Concatenate every rank's 1-D ``x`` in rank order; the shares may differ in size (or be empty).

    Runs one all-gather on ``group`` (every rank must call it, an empty share too).

    Args:
        x: this rank's share, ``[sizes[rank]]``, any dtype (a differentiable one to get gradients).
        sizes: every rank's share size, the same list on every rank of ``group``.
        group: the process group (the SP group under ``vision_sp``).

    Returns:
        ``[sum(sizes)]``, identical on every rank. Its backward sums the upstream gradients over
        ``group`` and hands each rank the gradient of its own share.
    """
    sizes = tuple(int(n) for n in sizes)
    if len(sizes) != dist.get_world_size(group) or x.dim() != 1 or x.numel() != sizes[dist.get_rank(group)]:
        raise ValueError(f"gather_shares: share of shape {tuple(x.shape)} does not match sizes {list(sizes)}.")
    if max(sizes) == 0:
        return x.new_zeros(0) + x.sum()  # nothing to move; keep the (empty) graph
    return _GatherShares.apply(x, sizes, group)

"""Collectives over the sequence-parallel (SP) process group.

Everything that moves data between SP ranks lives here:

* :func:`heads_from_sequence` — the forward Ulysses exchange. Each rank holds a contiguous chunk of
  the sequence for all heads; afterwards it holds the whole sequence for ``heads / sp`` heads.
  Q, K and V travel in **one** all-to-all.
* :func:`sequence_from_heads` — the inverse exchange for the attention output.
* :func:`sum_over_group` — an all-reduce whose backward is again a sum over the group (DESIGN §4).
* :func:`gather_sequence` — a non-differentiable all-gather along the sequence dimension, for
  metadata (positions, padding, labels) and for gathering predictions.

The autograd of the exchanges comes from ``torch.distributed._functional_collectives``
(``all_to_all_single_autograd``): its backward is the inverse all-to-all, which is exactly the
adjoint we need, and unlike ``torch.distributed.nn`` it works on gloo subgroups.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor
from torch.distributed import ProcessGroup


# Profiler range around every exchange, so benchmarks can attribute time and (with
# record_shapes) bytes to it; record_function costs next to nothing when no profiler runs.
PROFILE_LABEL = "ulysses/all_to_all"


def _all_to_all(send: Tensor, group: ProcessGroup) -> Tensor:
    """Equal-split all-to-all along dim 0 (dim 0 must have size ``sp``), differentiable."""
    with torch.profiler.record_function(PROFILE_LABEL):
        out = funcol.all_to_all_single_autograd(send, None, None, group)
        # The functional op returns a lazily-waited tensor; waiting here keeps later view/permute ops plain.
        return funcol.wait_tensor(out)


def heads_from_sequence(tensors: Sequence[Tensor], group: ProcessGroup) -> list[Tensor]:
    """Sequence-sharded → head-sharded, for several tensors in one all-to-all.

    Args:
        tensors: each ``[batch, heads_i, seq/sp, head_dim]`` (HF layout, any strides); ``heads_i``
            must be divisible by ``sp``. All share batch, local sequence length, dtype and device.
        group: the SP process group; rank ``r`` of it holds sequence chunk ``r``.

    Returns:
        One tensor per input, ``[batch, heads_i/sp, seq, head_dim]``: this rank's head slice
        (heads ``[r*heads_i/sp, (r+1)*heads_i/sp)``) over the full sequence, chunks in rank order.
        The results are strided views of the receive buffer (last dim contiguous) — for
        ``batch == 1`` no copy is made after the exchange; backends take strided inputs.
    """
    sp = dist.get_world_size(group)
    b, _, s_local, d = tensors[0].shape
    local_heads = []
    parts = []
    for x in tensors:
        h = x.shape[1] // sp
        local_heads.append(h)
        # [b, H, s/sp, d] -> [sp, b, s/sp, H/sp, d] by views only: dim 0 is the destination rank,
        # and the order inside matches the projections' physical [b, s, H, d] layout.
        parts.append(x.transpose(1, 2).unflatten(2, (sp, h)).permute(2, 0, 1, 3, 4))
    # The one copy on the way out: the contiguous send buffer [sp, b, s/sp, sum(H_i/sp), d].
    send = torch.cat(parts, dim=3) if len(parts) > 1 else parts[0].contiguous()
    recv = _all_to_all(send, group)  # [sp (source = sequence chunk), b, s/sp, sum(H_i/sp), d]
    outs = []
    offset = 0
    for h in local_heads:
        y = recv[:, :, :, offset : offset + h]  # [sp, b, s/sp, h, d]
        offset += h
        # chunks in rank order along the sequence: a view when b == 1, one copy otherwise
        outs.append(y.transpose(0, 1).reshape(b, sp * s_local, h, d).transpose(1, 2))
    return outs


def sequence_from_heads(x: Tensor, group: ProcessGroup) -> Tensor:
    """Head-sharded → sequence-sharded: the inverse of :func:`heads_from_sequence`.

    Args:
        x: ``[batch, seq, heads/sp, head_dim]`` — attention output of this rank's head slice over
            the full sequence (the layout HF attention backends return).
        group: the SP process group.

    Returns:
        ``[batch, seq/sp, heads, head_dim]``: this rank's sequence chunk for all heads, heads in
        rank order (so ``reshape(batch, seq/sp, heads*head_dim)`` matches the non-SP layout).
    """
    sp = dist.get_world_size(group)
    b, s, h, d = x.shape
    s_local = s // sp
    send = x.reshape(b, sp, s_local, h, d).transpose(0, 1).contiguous()  # dim 0: destination rank
    recv = _all_to_all(send, group)  # [sp (source = head group), b, s/sp, h, d]
    return recv.permute(1, 2, 0, 3, 4).reshape(b, s_local, sp * h, d)


class _SumOverGroup(torch.autograd.Function):
    """Forward: all-reduce sum. Backward: all-reduce sum of the upstream gradients."""

    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup) -> Tensor:  # type: ignore[override]
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def sum_over_group(x: Tensor, group: ProcessGroup) -> Tensor:
    """Differentiable sum of ``x`` over ``group``; every rank gets the same value.

    The backward sums the upstream gradients over the group, so with every rank's upstream
    gradient equal to ``c``, each rank's ``x`` receives ``sp * c``. That is what makes DDP's
    ``1/world`` average yield exactly the non-SP gradient (DESIGN §4).
    """
    return _SumOverGroup.apply(x, group)


def gather_sequence(x: Tensor, group: ProcessGroup, dim: int = 1) -> Tensor:
    """Concatenate every SP rank's ``x`` along ``dim`` in rank order (no autograd).

    Args:
        x: e.g. ``[batch, seq/sp, ...]`` with identical shapes on every rank of ``group``.
        group: the SP process group.

    Returns:
        ``[batch, seq, ...]`` — the full sequence, identical on every rank.
    """
    sp = dist.get_world_size(group)
    if sp == 1:
        return x
    x = x.contiguous()
    chunks = [torch.empty_like(x) for _ in range(sp)]
    dist.all_gather(chunks, x, group=group)
    return torch.cat(chunks, dim=dim)

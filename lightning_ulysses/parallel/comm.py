"""Collectives over the sequence-parallel (SP) process group.

Everything that moves data between SP ranks lives here:

* :func:`heads_from_sequence` — the forward Ulysses exchange. Each rank holds a contiguous chunk of
  the sequence for all heads; afterwards it holds the whole sequence for ``heads / sp`` heads.
  Q, K and V travel in **one** all-to-all.
* :func:`sequence_from_heads` — the inverse exchange for the attention output.
* :class:`PendingExchanges` — the same exchanges started asynchronously, forward and backward, so
  that the attention of one head group runs while another group's data moves (``overlap_chunks``).
* :func:`sum_over_group` — an all-reduce whose backward is again a sum over the group (docs/sp-loss.md).
* :func:`gather_sequence` — a non-differentiable all-gather along the sequence dimension, for
  metadata (positions, padding, labels) and for gathering predictions.

The autograd of the exchanges comes from ``torch.distributed._functional_collectives``
(``all_to_all_single_autograd``): its backward is the inverse all-to-all, which is exactly the
adjoint we need, and unlike ``torch.distributed.nn`` it works on gloo subgroups. The overlapped
path needs its own autograd (see :class:`PendingExchanges`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor
from torch.distributed import ProcessGroup


# Profiler range around every exchange, so benchmarks can attribute time and (with
# record_shapes) bytes to it; record_function costs next to nothing when no profiler runs.
PROFILE_LABEL = "ulysses/all_to_all"
# The overlapped exchanges (PendingExchanges): starting one, and the time spent blocked on one.
LAUNCH_LABEL = f"{PROFILE_LABEL}/launch"
WAIT_LABEL = f"{PROFILE_LABEL}/wait"


def _all_to_all(send: Tensor, group: ProcessGroup) -> Tensor:
    """Equal-split all-to-all along dim 0 (dim 0 must have size ``sp``), differentiable."""
    with torch.profiler.record_function(PROFILE_LABEL):
        out = funcol.all_to_all_single_autograd(send, None, None, group)
        # The functional op returns a lazily-waited tensor; waiting here keeps later view/permute ops plain.
        return funcol.wait_tensor(out)


def destination_major(x: Tensor, sp: int) -> Tensor:
    """``[batch, heads, seq/sp, head_dim]`` → ``[sp, batch, seq/sp, heads/sp, head_dim]``, by views only.

    Dim 0 is the destination rank (rank ``j`` gets heads ``[j*heads/sp, (j+1)*heads/sp)``); the order
    inside matches the projections' physical ``[b, s, H, d]`` layout, so packing costs one copy.
    """
    h = x.shape[1] // sp
    return x.transpose(1, 2).unflatten(2, (sp, h)).permute(2, 0, 1, 3, 4)


def sequence_major(x: Tensor, sp: int) -> Tensor:
    """``[batch, seq, heads, head_dim]`` → contiguous ``[sp, batch, seq/sp, heads, head_dim]``:
    the send buffer of the inverse exchange (dim 0: the destination rank = sequence chunk)."""
    b, s, h, d = x.shape
    return x.reshape(b, sp, s // sp, h, d).transpose(0, 1).contiguous()


def pack_send(parts: Sequence[Tensor]) -> Tensor:
    """Concatenate destination-major parts ``[sp, b, s/sp, h_i, d]`` into one contiguous send buffer."""
    return torch.cat(list(parts), dim=3) if len(parts) > 1 else parts[0].contiguous()


def unpack_received(recv: Tensor, counts: Sequence[int]) -> list[Tensor]:
    """Split a receive buffer ``[sp (source = sequence chunk), b, s/sp, sum(counts), d]`` into
    ``[b, counts_i, seq, d]`` tensors, chunks in rank order along the sequence.

    The results are strided views of ``recv`` when ``b == 1`` (last dim contiguous; backends take
    strided inputs), one copy each otherwise.
    """
    sp, b, s_local, _, d = recv.shape
    outs = []
    offset = 0
    for h in counts:
        y = recv[:, :, :, offset : offset + h]  # [sp, b, s/sp, h, d]
        offset += h
        outs.append(y.transpose(0, 1).reshape(b, sp * s_local, h, d).transpose(1, 2))
    return outs


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
    if len({x.shape[-1] for x in tensors}) > 1:
        return _heads_from_sequence_mixed(tensors, group)
    # The one copy on the way out: the contiguous send buffer [sp, b, s/sp, sum(H_i/sp), d].
    send = pack_send([destination_major(x, sp) for x in tensors])
    recv = _all_to_all(send, group)  # [sp (source = sequence chunk), b, s/sp, sum(H_i/sp), d]
    return unpack_received(recv, [x.shape[1] // sp for x in tensors])


def _heads_from_sequence_mixed(tensors: Sequence[Tensor], group: ProcessGroup) -> list[Tensor]:
    """:func:`heads_from_sequence` for tensors whose head sizes differ (MLA: Q/K ``d_qk``, V ``d_v``).

    Each part travels as ``[sp, b, s/sp, (H_i/sp)*d_i]`` in the same single all-to-all; the receive
    buffer is cut by element counts instead of heads.
    """
    sp = dist.get_world_size(group)
    parts = [destination_major(x, sp).flatten(3) for x in tensors]  # [sp, b, s/sp, h_i*d_i]
    recv = _all_to_all(torch.cat(parts, dim=3), group)
    _, b, s_local, _ = recv.shape
    outs, offset = [], 0
    for x, part in zip(tensors, parts):
        h, d = x.shape[1] // sp, x.shape[-1]
        y = recv[..., offset : offset + h * d].unflatten(3, (h, d))  # [sp, b, s/sp, h, d]
        offset += h * d
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
    recv = _all_to_all(sequence_major(x, sp), group)  # [sp (source = head group), b, s/sp, h, d]
    b, s_local, h, d = recv.shape[1:]
    return recv.permute(1, 2, 0, 3, 4).reshape(b, s_local, sp * h, d)


# -- exchanges that overlap compute ------------------------------------------------------------


class PendingExchanges:
    """Asynchronous all-to-alls on one SP group, so that compute can run while data moves.

    ``recv = pending.launch(send, key)`` starts an equal-split all-to-all along dim 0 and returns
    its receive buffer at once; ``pending.wait(recv, key)`` blocks until it has arrived and returns
    it usable. Both are differentiable and mirror each other in backward: the backward of ``wait``
    *starts* the inverse exchange of the incoming gradient and the backward of ``launch`` waits for
    it, so the autograd engine runs other backward nodes (the attention of another head group) in
    between. Which exchange is which is matched by ``key``; one object serves one forward call.

    Contract, internal to this package: the tensor ``launch`` returns must be used by exactly one
    ``wait`` (the gradient passed from one to the other is the still-arriving buffer, which must not
    be summed with anything before ``launch``'s backward waits for it).

    Why not ``torch.distributed._functional_collectives``: its autograd all-to-all waits inside
    the backward node, so no backward compute could overlap it.
    """

    def __init__(self, group: ProcessGroup) -> None:
        self.group = group
        self._work: dict[Any, tuple[Any, Tensor]] = {}

    def launch(self, send: Tensor, key: Any) -> Tensor:
        """Start the exchange of ``send`` (``[sp, ...]``, dim 0 = destination rank); returns the
        receive buffer ``[sp, ...]`` (dim 0 = source rank), valid only after :meth:`wait`."""
        return _LaunchAllToAll.apply(send, self, key)

    def wait(self, recv: Tensor, key: Any) -> Tensor:
        """Block until the exchange ``key`` has arrived; returns ``recv``."""
        return _WaitAllToAll.apply(recv, self, key)

    @property
    def in_flight(self) -> int:
        """Exchanges started and not yet waited for (forward and backward)."""
        return len(self._work)

    def _start(self, send: Tensor, key: Any) -> Tensor:
        if key in self._work:
            raise RuntimeError(f"exchange {key!r} is already in flight")
        send = send.contiguous()
        recv = torch.empty_like(send)
        with torch.profiler.record_function(LAUNCH_LABEL):
            work = dist.all_to_all_single(recv, send, group=self.group, async_op=True)
        self._work[key] = (work, send)  # the send buffer must outlive the exchange
        return recv

    def _finish(self, key: Any) -> None:
        work, _ = self._work.pop(key)
        with torch.profiler.record_function(WAIT_LABEL):
            work.wait()


class _LaunchAllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, send: Tensor, pending: PendingExchanges, key: Any) -> Tensor:  # type: ignore[override]
        ctx.pending, ctx.key = pending, ("backward", key)
        return pending._start(send, ("forward", key))

    @staticmethod
    def backward(ctx, grad_send: Tensor):  # type: ignore[override]
        # What arrives here is the buffer _WaitAllToAll.backward started filling with the inverse
        # exchange of this output's gradient, i.e. the gradient of `send` once it has arrived.
        ctx.pending._finish(ctx.key)
        return grad_send, None, None


class _WaitAllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, recv: Tensor, pending: PendingExchanges, key: Any) -> Tensor:  # type: ignore[override]
        ctx.pending, ctx.key = pending, ("backward", key)
        pending._finish(("forward", key))
        return recv

    @staticmethod
    def backward(ctx, grad_recv: Tensor):  # type: ignore[override]
        # An equal-split all-to-all is its own adjoint: start it and let the engine go on.
        return ctx.pending._start(grad_recv, ctx.key), None, None


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
    ``1/world`` average yield exactly the non-SP gradient (docs/sp-loss.md).
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


class _GatherSequenceGrad(torch.autograd.Function):
    """Forward: all-gather along ``dim``. Backward: sum the upstream gradients over the group, keep
    this rank's slice (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup, dim: int) -> Tensor:  # type: ignore[override]
        ctx.group, ctx.dim = group, dim
        ctx.lo, ctx.size = dist.get_rank(group) * x.shape[dim], x.shape[dim]
        return gather_sequence(x, group, dim=dim).clone()  # clone: with sp == 1 the input itself comes back

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        # Summing over the group (not averaging) is the scale DDP's 1/world average expects, exactly as
        # in sum_over_group: every SP rank computes the same value from the gathered tensor.
        if dist.get_backend(ctx.group) == "gloo":  # gloo has no reduce-scatter
            grad = grad.contiguous().clone()
            dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
            return grad.narrow(ctx.dim, ctx.lo, ctx.size).contiguous(), None, None
        send = grad.movedim(ctx.dim, 0).contiguous()
        out = send.new_empty((ctx.size, *send.shape[1:]))
        dist.reduce_scatter_tensor(out, send, op=dist.ReduceOp.SUM, group=ctx.group)
        return out.movedim(0, ctx.dim), None, None


def gather_sequence_grad(x: Tensor, group: ProcessGroup, dim: int = 1) -> Tensor:
    """Differentiable :func:`gather_sequence`: ``[batch, seq/sp, ...]`` → ``[batch, seq, ...]`` on every rank.

    Meant for values every SP rank then uses identically (a loss computed from the whole sequence):
    the backward sums the upstream gradients over ``group`` and keeps this rank's slice, so each rank
    receives ``sp x`` its share of the gradient — the scale DDP's ``1/(dp*sp)`` average turns into the
    non-SP gradient (README, "How it works"). Gather small per-token tensors, never ``[b, s, vocab]``.
    """
    return _GatherSequenceGrad.apply(x, group, dim)


# Autograd Functions whose backward reduces over the SP group: a loss with one of them in its graph
# went through an SP reduction (checked by lightning_ulysses.losses.objectives.is_sp_reduced).
SP_REDUCTIONS: tuple[type[torch.autograd.Function], ...] = (_SumOverGroup, _GatherSequenceGrad)

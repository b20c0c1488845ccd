"""The causal-balanced (zigzag) layout of ring blocks, reached from the contiguous one by one exchange.

The data path gives SP ranks contiguous chunks, so after the Ulysses exchange ring rank ``j`` holds
the contiguous ring block ``j`` (tokens ``[j*s/R, (j+1)*s/R)``). Under causal attention that block
interacts with ``j + 1`` of the ``R`` key blocks: the last ring rank computes ``R`` block pairs
while the first computes one, and every ring step waits for the slowest. In the zigzag layout the
sequence is cut into ``2R`` halves and ring rank ``j`` holds halves ``j`` and ``2R - 1 - j``
(:func:`~.ring.zigzag_indices`): every rank then computes the same ``R + 1`` half-block pairs of
``4R`` skipped or computed ones.

Re-laying out the data path itself (the sampler, positions, labels, every gathered tensor) would
touch every module that slices the sequence; instead the attention wrapper moves Q/K/V into the
zigzag layout right before ring attention and the output back right after it: one all-to-all of
half blocks over the ring group each way (each rank keeps or sends each of its two halves), whose
autograd is the inverse exchange. The busiest rank sends both halves of its Q, K, V and output (in a
ring of 2 every rank keeps one), where the ring passes ``R - 1`` whole K/V blocks; it buys a compute
makespan of ``(R+1)/2`` block pairs instead of ``R``.

Everything here runs on the **ring** process group.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor
from torch.distributed import ProcessGroup

from .comm import PROFILE_LABEL


def contiguous_halves(ring: int) -> list[list[int]]:
    """The halves (of ``2 * ring``) each ring rank holds in the contiguous layout: ``[2j, 2j + 1]``."""
    return [[2 * j, 2 * j + 1] for j in range(ring)]


def zigzag_halves(ring: int) -> list[list[int]]:
    """The halves each ring rank holds in the zigzag layout: ``[j, 2 * ring - 1 - j]``."""
    return [[j, 2 * ring - 1 - j] for j in range(ring)]


def relayout(x: Tensor, dim: int, have: Sequence[Sequence[int]], want: Sequence[Sequence[int]],
             group: ProcessGroup) -> Tensor:
    """Move halves of ring blocks between ring ranks, differentiably.

    Args:
        x: this rank's block; dimension ``dim`` is its ``2 * half`` tokens, the halves
            ``have[rank]`` in that order (e.g. Q/K/V ``[b, h, s_blk, d]`` with ``dim=2``, the
            attention output ``[b, s_blk, h, d]`` with ``dim=1``).
        have / want: per ring rank, the two halves it holds now and the two it must hold after
            (each a partition of ``range(2 * ring)`` over the ranks).
        group: the ring process group (rank ``r`` of it holds ``have[r]``).

    Returns:
        The same shape as ``x``, holding the halves ``want[rank]`` in that order. The backward is the
        inverse exchange (``all_to_all_single_autograd``).
    """
    ring, rank = dist.get_world_size(group), dist.get_rank(group)
    half = x.shape[dim] // 2
    parts = dict(zip(have[rank], x.split(half, dim=dim)))
    owner = {h: r for r, hs in enumerate(have) for h in hs}
    # send: to each destination in rank order, the halves it wants from me, in its wanted order
    send = [parts[h] for d in range(ring) for h in want[d] if owner[h] == rank]
    send_counts = [sum(owner[h] == rank for h in want[d]) * half for d in range(ring)]
    # receive: from each source in rank order, the halves I want from it, in my wanted order
    arrived = [h for s in range(ring) for h in want[rank] if owner[h] == s]
    recv_counts = [sum(owner[h] == s for h in want[rank]) * half for s in range(ring)]
    buffer = torch.cat(send, dim=dim).movedim(dim, 0).contiguous()
    with torch.profiler.record_function(f"{PROFILE_LABEL}/zigzag"):
        received = funcol.wait_tensor(funcol.all_to_all_single_autograd(buffer, recv_counts, send_counts, group))
    got = dict(zip(arrived, received.movedim(0, dim).split(half, dim=dim)))
    return torch.cat([got[h] for h in want[rank]], dim=dim)

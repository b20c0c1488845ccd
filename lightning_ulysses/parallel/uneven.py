"""An all-gather of shares of different sizes, differentiable: :func:`gather_shares`.

:func:`~.comm.gather_sequence_grad` gathers equal chunks. Work split by items (the images of a batch
under ``vision_sp``) gives each SP rank a share of its own size, possibly empty; collectives want
equal buffers, so each share travels padded to the largest one and the padding is dropped on arrival.
The backward is the adjoint: every rank's upstream gradient of the whole result is summed over the
group and each rank keeps the part of its own share (a reduce-scatter): the padded gather is
:func:`~.comm.gather_sequence_grad` itself, so the two share one collective and its gloo fallback.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from .comm import gather_sequence_grad


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
    width = max(sizes)
    if width == 0:
        return x.new_zeros(0) + x.sum()  # nothing to move; keep the (empty) graph
    # equal buffers for the collective: each share padded to the largest; gather_sequence_grad's
    # backward is the adjoint wanted here (summed over the group, this rank's padded slice kept)
    padded = torch.nn.functional.pad(x, (0, width - x.numel()))
    full = gather_sequence_grad(padded[None], group, dim=1)[0]
    return torch.cat([full[r * width: r * width + n] for r, n in enumerate(sizes)])

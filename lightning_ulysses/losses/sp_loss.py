"""The exact token-mean causal-LM loss over a whole SP-sharded sequence (docs/sp-loss.md).

Rank ``r`` of an SP group holds the loss sum ``S_r`` over its ``n_r`` valid tokens; with
``N = sum_r n_r`` every rank returns ``sum_over_group(S_r) / N``. The forward value is the group's
exact token mean on every rank; the backward gives rank ``r`` the gradient ``sp * dS_r / N``, which
DDP's ``1/world`` average turns into exactly the non-SP gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributed import ProcessGroup

from ..parallel.comm import sum_over_group


def sp_mean(local_sum: Tensor, total_count: Tensor | int, group: ProcessGroup | None) -> Tensor:
    """``sum_over_group(local_sum) / total_count``; 0 (not NaN) when ``total_count`` is 0.

    Args:
        local_sum: scalar loss sum over this rank's valid tokens (differentiable).
        total_count: number of valid tokens over the whole SP group (the same on every rank).
        group: the SP process group, or ``None`` for a single process.
    """
    total = local_sum if group is None else sum_over_group(local_sum, group)
    count = torch.as_tensor(total_count, device=total.device, dtype=total.dtype)
    return total / count.clamp_min(1)


def causal_lm_loss_sum(logits: Tensor, shift_labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Sum of token cross-entropies in float32 over labels that are not ``ignore_index``.

    Args:
        logits: ``[batch, seq_local, vocab]``.
        shift_labels: ``[batch, seq_local]``, already shifted on the full sequence.
    """
    return F.cross_entropy(
        logits.float().flatten(0, -2),
        shift_labels.flatten().to(logits.device),
        ignore_index=ignore_index,
        reduction="sum",
    )


def shift_labels_full(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """``labels[:, 1:]`` padded with ``ignore_index`` at the end: the target of every position.

    Must run on the full sequence before it is sharded so no label is lost at a shard edge.
    """
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index)

"""Custom objectives that stay exact under Ulysses SP (README, "Custom objectives").

Under SP a rank holds ``[batch, seq/sp]`` of every per-token quantity (logits, log-probs, per-token
losses). A value of the *whole* sequence needs exactly one reduction over the SP group:

* :func:`sp_token_mean` — the token mean of any per-token loss over the whole sequence;
* :func:`sp_sequence_sum` — per-sample sums over the whole sequence (sequence log-probs for DPO);
* :func:`sp_gather_tokens` — the whole sequence of a small per-token tensor (never ``[b, s, vocab]``);
* :func:`sp_shift_labels` / :func:`sp_num_valid_tokens` — this rank's targets, shifted on the full
  sequence (so no target is lost at a chunk edge), and the valid-token count of the whole sequence;
* :func:`token_logprobs` — ``log p(target)`` per position from this rank's logits.

Every reduction is differentiable with the gradient scale of the SP loss (each rank's share times
``sp``), so DDP's and FSDP's average over ``dp x sp`` ranks yields exactly the non-SP gradient.
Every function takes ``group``: ``None`` (the default) means the SP group of the Ulysses strategy
running in this process while SP is active, and no SP otherwise — so one LightningModule or Fabric
loop computes the same objective with and without SP. Outside Lightning pass the group given to
:func:`~lightning_ulysses.apply_ulysses`.

:func:`is_sp_reduced` tells whether a loss went through any of these reductions; the strategies use
it to refuse a rank-local loss at the first training step (``check_loss``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.distributed import ProcessGroup

from ..parallel.comm import SP_REDUCTIONS, gather_sequence, gather_sequence_grad, sum_over_group
from .sp_loss import shift_labels_full

IGNORE_INDEX = -100
_COMPILED_NODE = "CompiledFunctionBackward"  # torch.compile's backward node (AOTAutograd)

# Callables that return the SP group of a running Ulysses strategy while SP is active (else None);
# the strategies add one in setup and remove it in teardown.
_group_sources: list[Callable[[], ProcessGroup | None]] = []


def current_sp_group() -> ProcessGroup | None:
    """The SP group of the Ulysses strategy running in this process, while SP is active.

    ``None`` without a Ulysses strategy, before its setup, after its teardown, and in stages it runs
    without SP (``predict`` by default, validation with ``eval_mode="bypass"``, inside
    ``handle.bypass()``).
    """
    for source in reversed(_group_sources):
        group = source()
        if group is not None:
            return group
    return None


def register_group_source(source: Callable[[], ProcessGroup | None]) -> Callable[[], None]:
    """Make ``source`` answer :func:`current_sp_group`; returns the function that removes it."""
    _group_sources.append(source)

    def remove() -> None:
        if source in _group_sources:
            _group_sources.remove(source)

    return remove


def _resolve(group: ProcessGroup | None) -> ProcessGroup | None:
    group = current_sp_group() if group is None else group
    if group is not None and dist.get_world_size(group) == 1:
        return None
    return group


def _mask_of(mask: Tensor, like: Tensor) -> Tensor:
    if mask.shape != like.shape[: mask.dim()]:
        raise ValueError(
            f"mask {tuple(mask.shape)} must cover the leading dims of the values {tuple(like.shape)} "
            "([batch, seq/sp] under SP, the same slice of the sequence)."
        )
    return mask.to(device=like.device, dtype=torch.float32).reshape(*mask.shape, *([1] * (like.dim() - mask.dim())))


# -- labels ------------------------------------------------------------------------------------


def sp_shift_labels(batch: Mapping[str, Any], group: ProcessGroup | None = None,
                    ignore_index: int = IGNORE_INDEX) -> Tensor:
    """This rank's targets ``[batch, seq/sp]``: position ``t`` predicts token ``t + 1`` of the full sequence.

    Returns ``batch["shift_labels"]`` when present (the Ulysses strategies and
    :func:`~lightning_ulysses.shard_batch` put it in every batch). Otherwise it is built from
    ``batch["labels"]`` — without SP by shifting, under SP by shifting the labels gathered over
    ``group``, so the target of the last position of each chunk is not lost. Targets predicted from a
    padding position (``attention_mask == 0``) are ``ignore_index``, as in the sharded batches.
    """
    if batch.get("shift_labels") is not None:
        return batch["shift_labels"]
    labels = batch.get("labels")
    if labels is None:
        raise ValueError("sp_shift_labels needs 'shift_labels' or 'labels' ([batch, seq/sp]) in the batch.")
    mask = batch.get("attention_mask")
    group = _resolve(group)
    lo, s_local = 0, labels.shape[1]
    if group is not None:
        lo = dist.get_rank(group) * s_local
        labels = gather_sequence(labels, group, dim=1)
        mask = None if mask is None else gather_sequence(mask, group, dim=1)
    shifted = shift_labels_full(labels, ignore_index)
    if mask is not None:
        shifted = shifted.masked_fill(mask == 0, ignore_index)
    return shifted[:, lo : lo + s_local]


def sp_num_valid_tokens(shift_labels: Tensor, group: ProcessGroup | None = None,
                        ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Targets that are not ``ignore_index`` in the whole sequence: a scalar int64, the same on every SP rank.

    Args:
        shift_labels: ``[batch, seq/sp]`` from :func:`sp_shift_labels`.
        group: the SP group (default: :func:`current_sp_group`).
    """
    count = (shift_labels != ignore_index).sum()
    group = _resolve(group)
    if group is not None:
        dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
    return count


# -- reductions --------------------------------------------------------------------------------


def sp_token_mean(values: Tensor, mask: Tensor, group: ProcessGroup | None = None,
                  count: Tensor | float | None = None) -> Tensor:
    """Exact mean of a per-token quantity over the whole sequence: ``sum(values * mask) / sum(mask)``,
    both sums taken over every SP rank. A scalar in float32, the same on every rank of ``group``.

    Args:
        values: ``[batch, seq/sp, ...]`` per-token losses (e.g. unreduced cross-entropy, a per-token
            KL), differentiable.
        mask: ``[batch, seq/sp]`` (or the full shape of ``values``): bool for valid tokens, or float
            per-token weights, which then also form the denominator (a weighted mean).
        group: the SP group (default: :func:`current_sp_group`).
        count: the denominator, if not ``sum(mask)`` (e.g. the valid tokens of a whole DP batch).

    Returns 0, not NaN, when nothing is valid. The denominator is not differentiated.
    """
    m = _mask_of(mask, values)
    local = (values.float() * m).sum()
    group = _resolve(group)
    total = local if group is None else sum_over_group(local, group)
    if count is None:
        count = m.detach().expand_as(values).sum()
        if group is not None:
            count = count.clone()
            dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
    count = torch.as_tensor(count, device=total.device, dtype=total.dtype)
    return total / torch.where(count != 0, count, torch.ones_like(count))


def sp_sequence_sum(values: Tensor, mask: Tensor | None = None, group: ProcessGroup | None = None) -> Tensor:
    """Per-sample sum over the whole sequence: ``[batch]``, float32, the same on every SP rank.

    The sequence log-probability for DPO is ``sp_sequence_sum(token_logprobs(logits, labels),
    labels != -100)``.

    Args:
        values: ``[batch, seq/sp]`` per-token values, differentiable.
        mask: ``[batch, seq/sp]`` bool or float weights; ``None`` sums every position.
        group: the SP group (default: :func:`current_sp_group`).
    """
    if values.dim() != 2:
        raise ValueError(f"sp_sequence_sum expects values [batch, seq/sp], got {tuple(values.shape)}.")
    v = values.float() if mask is None else values.float() * _mask_of(mask, values)
    local = v.sum(dim=1)
    group = _resolve(group)
    return local if group is None else sum_over_group(local, group)


def sp_gather_tokens(x: Tensor, group: ProcessGroup | None = None) -> Tensor:
    """The whole sequence of a per-token tensor: ``[batch, seq/sp, ...]`` → ``[batch, seq, ...]``.

    Differentiable, for values every SP rank then uses the same way (a loss over the whole sequence, a
    prediction): the backward sums the gradients over the group. Under SP the result covers the
    sequence padded to a multiple of ``sp``; drop the tail beyond your sequence length. Gather small
    tensors (log-probs, per-token losses), never ``[batch, seq, vocab]`` logits.
    """
    group = _resolve(group)
    if group is None:
        return x
    if not x.requires_grad:  # masks, labels, predictions: no autograd, any dtype
        return gather_sequence(x.to(torch.uint8) if x.dtype == torch.bool else x, group, dim=1).to(x.dtype)
    return gather_sequence_grad(x, group, dim=1)


def token_logprobs(logits: Tensor, shift_labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """``log p(target)`` at each of this rank's positions: ``[batch, seq/sp]`` float32, 0 where ignored.

    Args:
        logits: ``[batch, seq/sp, vocab]`` — the model's output for this rank's chunk.
        shift_labels: ``[batch, seq/sp]`` from :func:`sp_shift_labels`.
    """
    targets = shift_labels.to(logits.device)
    valid = targets != ignore_index
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.masked_fill(~valid, 0).flatten(), reduction="none")
    return -nll.view(targets.shape) * valid


# -- the check the strategies run --------------------------------------------------------------


def is_sp_reduced(loss: Tensor) -> bool:
    """True if ``loss``'s autograd graph contains an SP reduction (:func:`sp_token_mean`,
    :func:`sp_sequence_sum`, :func:`sp_gather_tokens`, HF's ``out.loss`` and the tiled loss under SP).

    A loss without one was computed from this rank's chunk alone: its value is the chunk's, not the
    sequence's. Breadth-first from the loss, so the usual case (the reduction a few nodes below the
    loss) costs next to nothing. A region compiled by ``torch.compile`` is opaque to this walk and
    counts as reduced: it may hold the reduction, and a false alarm would stop correct training.
    """
    root = loss.grad_fn
    if root is None:
        return False
    frontier, seen = [root], {root}
    while frontier:
        nxt = []
        for node in frontier:
            if getattr(node, "_forward_cls", None) in SP_REDUCTIONS or type(node).__name__ == _COMPILED_NODE:
                return True
            for child, _ in node.next_functions:
                if child is not None and child not in seen:
                    seen.add(child)
                    nxt.append(child)
        frontier = nxt
    return False

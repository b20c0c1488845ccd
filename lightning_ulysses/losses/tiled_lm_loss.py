"""Tiled LM loss: summed token cross-entropy through the LM head, one sequence tile of logits at a time.

:func:`tiled_causal_lm_loss_sum` never materialises ``[batch, seq, vocab]`` logits: each tile's loss is
differentiated as soon as it is computed, so backward only scales the stored gradients (float16
recomputes in backward instead, under the loss scale). :mod:`.hf_loss` installs it on a model.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..tiling.compute import _accumulate, _unique, sequence_tiled_compute
from ..tiling.shards import tile_bounds

__all__ = ["tiled_causal_lm_loss_sum"]


class _LossSumGradsInForward(torch.autograd.Function):
    """``sum(tile_loss(hidden[:, a:b], labels[:, a:b]) for a, b in bounds)`` with its gradients taken in forward.

    ``apply(tile_loss, bounds, hidden [batch, seq, hidden], labels [batch, seq], *params)``: each tile's
    scalar loss is differentiated as soon as it is computed, w.r.t. its hidden-state slice and ``params``
    (the LM head's trainable tensors), and its logits are freed before the next tile. Backward multiplies
    the stored sums by the upstream gradient, so nothing is recomputed and every parameter gets its
    gradient once per backward (DDP/FSDP hooks fire once). Runs locally; no process group is involved.
    """

    @staticmethod
    def forward(ctx: Any, tile_loss: Callable[..., torch.Tensor], bounds: list[tuple[int, int]],
                hidden: torch.Tensor, labels: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        need_h = ctx.needs_input_grad[2]
        need_p = ctx.needs_input_grad[4:]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_p: list[torch.Tensor | None] = [None] * len(params)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        wanted = [p for p, need in zip(params, need_p) if need]
        with torch.enable_grad():
            for a, b in bounds:
                h = hidden[:, a:b].detach().requires_grad_(need_h)
                loss = tile_loss(h, labels[:, a:b])
                inputs = ([h] if need_h else []) + wanted
                if loss.requires_grad and inputs:
                    grads = list(torch.autograd.grad(loss, inputs, allow_unused=True))
                    if need_h:
                        g = grads.pop(0)
                        if g is not None:
                            grad_h[:, a:b].copy_(g)
                    it = iter(grads)
                    grad_p = [_accumulate(acc, next(it)) if need else acc for acc, need in zip(grad_p, need_p)]
                total += loss.detach().float()
        # Kept on ctx, not saved for backward: they are intermediates that backward hands to autograd
        # after scaling them in place, so the step never holds a second hidden- or LM-head-sized copy.
        ctx.grads = (grad_h, grad_p)
        ctx.dtypes = [p.dtype for p in params]
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.grads is None:
            raise RuntimeError(
                "the tiled LM loss takes its gradients in forward and hands them over at the first backward; a "
                "second backward through the same loss (retain_graph=True) is not supported: compute the loss again."
            )
        (grad_h, stored), ctx.grads = ctx.grads, None
        # A 0-dim float32 factor keeps each stored gradient's dtype and multiplies in float32 internally.
        if grad_h is not None:
            grad_h.mul_(grad_output)
        grad_p: list[torch.Tensor | None] = []
        for acc, dtype in zip(stored, ctx.dtypes):
            if acc is not None and acc.dtype == dtype:
                acc.mul_(grad_output)
            elif acc is not None:  # float32 sums of low-precision parameters: written straight into their dtype
                acc = torch.mul(acc, grad_output, out=torch.empty_like(acc, dtype=dtype))
            grad_p.append(acc)
        return (None, None, grad_h, None, *grad_p)


def tiled_causal_lm_loss_sum(
    hidden_states: torch.Tensor,
    lm_head: nn.Module,
    shift_labels: torch.Tensor,
    shards: int,
    ignore_index: int = -100,
    logits_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token cross-entropy through ``lm_head`` without materialising ``[batch, seq, vocab]`` logits.

    Runs locally on the calling rank; no process group is involved (the caller reduces the sum and the
    count over the sequence-parallel / data-parallel groups as its loss normalisation requires).

    Args:
        hidden_states: ``[batch, seq, hidden]`` final hidden states (after the final norm).
        lm_head: maps ``[batch, tile, hidden]`` to ``[batch, tile, vocab]``; its trainable parameters get
            their gradient once per backward.
        shift_labels: ``[batch, seq]`` labels already aligned with ``hidden_states`` (not shifted again).
        shards: number of sequence tiles (see :func:`tile_bounds`); peak extra memory is about one tile of
            logits (plus its float32 copy and gradient) instead of the full ``[batch, seq, vocab]``.
        ignore_index: label value excluded from the sum and the count.
        logits_fn: optional ``[batch, tile, vocab] -> [batch, tile, vocab]`` applied to each tile's logits
            before the loss (e.g. final-logit softcapping).

    Returns:
        ``(loss_sum, n_valid)``: the float32 scalar sum of cross-entropies over labels ``!= ignore_index``
        (0, not NaN, when there are none), differentiable w.r.t. ``hidden_states`` and the ``lm_head``
        parameters; and the int64 scalar count of such labels, without grad.

    With grad enabled, each tile's gradients are taken right after its loss, in forward (the loss is a
    scalar, so backward only has to scale them by the upstream gradient): no tile is recomputed, at the
    price of holding the ``hidden_states``-sized and ``lm_head``-sized gradients from forward to backward,
    which backward would allocate anyway. With float16 anywhere (tensors or autocast) tiles are
    recomputed in backward instead, so that float16 gradients are formed with the loss scale applied.
    """
    if hidden_states.dim() != 3 or shift_labels.shape != hidden_states.shape[:2]:
        raise ValueError(f"expected hidden_states [batch, seq, hidden] and shift_labels [batch, seq], got "
                         f"{tuple(hidden_states.shape)} and {tuple(shift_labels.shape)}")

    def tile_loss(hidden_states: torch.Tensor, shift_labels: torch.Tensor) -> torch.Tensor:
        logits = lm_head(hidden_states)
        if logits_fn is not None:
            logits = logits_fn(logits)
        # reduction="sum" over an all-ignored tile is exactly 0 (a "mean" would be 0/0).
        return F.cross_entropy(logits.float().flatten(0, 1), shift_labels.flatten(),
                               ignore_index=ignore_index, reduction="sum")

    params = _unique(p for p in lm_head.parameters() if p.requires_grad)
    bounds = tile_bounds(hidden_states.shape[1], shards)
    device_type = hidden_states.device.type
    float16 = (hidden_states.dtype == torch.float16 or any(p.dtype == torch.float16 for p in params)
               or (torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.float16))
    if float16 and torch.is_grad_enabled():
        # float16 gradients need the loss scale inside the backward pass to stay out of the subnormal
        # range; the upstream gradient (which carries it) only exists in backward, so recompute there.
        loss_sum = sequence_tiled_compute(
            tile_loss, seqlen=hidden_states.shape[1], shards=shards,
            kwargs_to_shard={"hidden_states": hidden_states, "shift_labels": shift_labels}, kwargs_to_pass={},
            grad_requiring_tensor_key="hidden_states", compute_params=params, output_unshard_dimension=0,
            output_reduction="sum")
    elif not torch.is_grad_enabled() or not (hidden_states.requires_grad or params):
        with torch.no_grad():
            loss_sum = torch.zeros((), dtype=torch.float32, device=hidden_states.device)
            for a, b in bounds:
                loss_sum += tile_loss(hidden_states[:, a:b], shift_labels[:, a:b])
    else:
        loss_sum = _LossSumGradsInForward.apply(tile_loss, bounds, hidden_states, shift_labels, *params)
    n_valid = (shift_labels != ignore_index).sum()
    return loss_sum, n_valid


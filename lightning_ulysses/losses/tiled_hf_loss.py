"""The tiled loss installed on a transformers causal LM: :func:`apply_tiled_loss` (see docs/tiling.md).

:func:`apply_tiled_loss` wraps a transformers causal LM's forward (inside the Ulysses wrapper, so
under SP it sees the prepared ``shift_labels`` and forward context): when labels are given in
training, the model runs with ``logits_to_keep=1`` — so HF computes logits for one position only —
the final hidden states are captured from the decoder, and the loss is computed through the LM
head one sequence tile at a time. The ``[batch, seq, vocab]`` logits never exist; ``out.loss``
keeps its exact meaning (under SP: the whole-sequence token mean on every SP rank) and
``out.logits`` is ``None``. Without labels, or in eval (unless asked), the forward is untouched.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Literal

import torch
from torch import Tensor, nn

from ..models.context import CONTEXT_KWARG
from ..models.apply import IGNORE_INDEX
from .sp_loss import shift_labels_full, sp_mean
from ..models.patching import add_forward_wrapper, base_forward, bind_call, remove_forward_wrapper
from .tiled_lm_loss import tiled_causal_lm_loss_sum
from ..tiling.shards import agree_on_shards

DEFAULT_TILE_BYTES = 256 * 2**20


def auto_shards(batch: int, seq: int, vocab: int, tile_bytes: int = DEFAULT_TILE_BYTES) -> int:
    """Tiles so that one tile's float32 logits ``[batch, seq/shards, vocab]`` fit in ``tile_bytes``."""
    return max(1, min(seq, math.ceil(batch * seq * vocab * 4 / tile_bytes)))


class TiledLossHandle:
    """The result of :func:`apply_tiled_loss`; :meth:`remove` restores the model's forward."""

    def __init__(self, model: nn.Module, shards: int | Literal["auto"], tile_bytes: int, in_eval: bool) -> None:
        if shards != "auto" and (not isinstance(shards, int) or shards < 1):
            raise ValueError(f"shards must be a positive integer or 'auto', got {shards!r}.")
        params = inspect.signature(base_forward(model)).parameters
        if "logits_to_keep" not in params or not hasattr(model, "get_decoder"):
            raise TypeError(
                f"{type(model).__name__} has no `logits_to_keep` argument or decoder; the tiled loss supports "
                "transformers causal LMs (LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM, ...)."
            )
        self.model = model
        self.shards = shards
        self.tile_bytes = tile_bytes
        self.in_eval = in_eval
        self._signature = inspect.signature(base_forward(model))
        cap = getattr(model.config, "final_logit_softcapping", None)
        self._logits_fn: Callable[[Tensor], Tensor] | None = (lambda x: torch.tanh(x / cap) * cap) if cap else None
        self._token = add_forward_wrapper(model, self._forward, priority=10)

    def remove(self) -> None:
        remove_forward_wrapper(self.model, self._token)

    def _forward(self, next_forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        call = bind_call(self._signature, args, kwargs)
        labels, shift = call.pop("labels", None), call.pop("shift_labels", None)
        if (labels is None and shift is None) or not (self.model.training or self.in_eval):
            return next_forward(*args, **kwargs)
        num_items = call.pop("num_items_in_batch", None)
        ctx = call.get(CONTEXT_KWARG)
        captured: list[Any] = []
        hook = self.model.get_decoder().register_forward_hook(lambda m, a, out: captured.append(out))
        try:
            out = next_forward(**call, logits_to_keep=1)
        finally:
            hook.remove()
        last = captured[-1]
        hidden = last.last_hidden_state if hasattr(last, "last_hidden_state") else last[0]
        if shift is None:
            shift = shift_labels_full(labels, IGNORE_INDEX)
        shards = self.shards
        if shards == "auto":
            shards = agree_on_shards(auto_shards(hidden.shape[0], hidden.shape[1], self.model.config.vocab_size,
                                                 self.tile_bytes))
        head = self.model.get_output_embeddings()
        local_sum, count = tiled_causal_lm_loss_sum(hidden, head, shift.to(hidden.device), shards,
                                                    IGNORE_INDEX, logits_fn=self._logits_fn)
        if ctx is not None:  # under Ulysses: exact whole-sequence mean over the SP group
            ctx.loss_calls += 1
            out.loss = sp_mean(local_sum, num_items if num_items is not None else ctx.num_valid, ctx.group)
        else:
            out.loss = sp_mean(local_sum, num_items if num_items is not None else count, None)
        out.logits = None
        return out


def apply_tiled_loss(
    model: nn.Module, shards: int | Literal["auto"] = "auto", tile_bytes: int = DEFAULT_TILE_BYTES,
    in_eval: bool = False,
) -> TiledLossHandle:
    """Compute a causal LM's training loss tile by tile from its hidden states.

    Args:
        model: a transformers causal LM (with or without :func:`~lightning_ulysses.apply_ulysses`,
            in either order).
        shards: tiles along this rank's sequence; ``"auto"`` picks the fewest tiles whose float32
            logits ``[batch, seq/shards, vocab]`` fit in ``tile_bytes``, agreed (max) over all ranks.
        in_eval: tile in eval mode too (logits are then not returned).
    """
    return TiledLossHandle(model, shards, tile_bytes, in_eval)

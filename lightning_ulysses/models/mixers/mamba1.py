"""Mamba1 (selective scan) layers under SP: Jamba, and every mixer whose forward has Jamba's form.

Mamba1 is independent per channel except for one step: ``x_proj`` forms ``dt``, ``B`` and ``C`` from
**every** channel of the convolution's output at a token. So the convolution runs head-sharded on
the full sequence, its output goes back to sequence shards for the per-token projections, and the
scan inputs travel once more (``B``/``C`` are shared by all channels, so every rank receives them)::

    hidden [b, s/sp, D] ──(padding zeroed, in_proj: per token)──▶ x, gate [b, s/sp, I]
    all-to-all #1: x ▶ [b, I/sp, s]; causal conv1d on this rank's channels, FULL sequence, per document
    all-to-all #2: conv output ▶ [b, s/sp, I]; x_proj, dt/B/C norms, dt_proj (per token)
    all-to-all #3: dt [I] and B, C [N] (replicated to every rank) ▶ [b, I/sp, s], [b, N, s]
    selective scan on this rank's channels (conv output still held from #1), per document
    all-to-all #4: y ▶ [b, s/sp, I]; y·silu(gate), out_proj (per token)

Per token and direction that is ``4·I + 2·sp·N`` elements / ``sp`` against ``2·I + ...`` for Mamba2.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..context import ForwardContext
from .common import (channels_from_sequence, check_sp, depthwise_weight, divisors, document_spans, forward_names,
                     kernel, local_valid, no_cache, patch_forward, per_document, replicate_groups,
                     sequence_from_channels, zero_padding)

# What Jamba's forward reads (common.forward_names): apply_mask_to_padding_states → in_proj →
# causal_conv1d_fn → padding zeroed → x_proj → dt/b/c_layernorm → dt_proj.weight @ dt →
# mamba_selective_scan(D, z=gate, delta_bias, softplus) → out_proj. ("config"/"hasattr": its
# quantized-dt_proj branch, refused below.)
JAMBA_FORM = frozenset({
    "A_log", "D", "activation", "apply_mask_to_padding_states", "b_layernorm", "bias", "c_layernorm",
    "causal_conv1d_fn", "causal_conv1d_update", "chunk", "config", "conv1d", "conv_kernel_size", "dt_layernorm",
    "dt_proj", "dtype", "exp", "float", "get_conv_state", "get_recurrent_state", "hasattr", "in_proj",
    "is_recording_past", "layer_idx", "mamba_selective_scan", "mamba_selective_state_update", "out_proj", "shape",
    "split", "squeeze", "ssm_state_size", "time_step_rank", "to", "torch", "transpose", "unsqueeze",
    "update_conv_state", "update_recurrent_state", "use_associative_scan", "use_mambapy", "weight", "x_proj"})


class Mamba1SP:
    """:class:`~lightning_ulysses.models.mixers.MixerSP` for one Mamba1 mixer (channels split over SP)."""

    family = "Mamba1"

    def __init__(self, module: nn.Module) -> None:
        self.channels: int = module.intermediate_size
        self.name = type(module).__name__

    def valid_sp(self) -> list[int]:
        return divisors(self.channels)

    def check(self, sp: int) -> None:
        check_sp(sp, self.valid_sp(), f"{self.name} (Mamba1: {self.channels} channels; sp must divide them)")

    def apply(self, module: nn.Module, get_context: Callable[[], ForwardContext | None]) -> Callable[[], None]:
        return patch_forward(module, _sp_forward, get_context)


def _sp_forward(module: nn.Module, ctx: ForwardContext, hidden_states: Tensor, cache_params: Any = None,
                attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
    """The mixer's forward for ``hidden_states`` ``[b, s/sp, D]`` (this rank's chunk) under SP.

    Padding comes from the gathered metadata (``ctx.metadata.valid``): zeroed before ``in_proj`` and
    after the convolution, as the module does. Documents (``ctx.metadata.doc_ids``) run one by one.
    """
    no_cache(cache_params, module)
    sp, group = ctx.sp_size, ctx.group
    dtype = hidden_states.dtype
    hidden = zero_padding(hidden_states, local_valid(ctx))
    x, gate = module.in_proj(hidden).chunk(2, dim=-1)  # [b, s/sp, I] each
    width = module.intermediate_size // sp
    channels = torch.arange(ctx.sp_rank * width, (ctx.sp_rank + 1) * width, device=x.device)

    (x,) = channels_from_sequence([x], group)  # [b, I/sp, s]
    weight, bias = depthwise_weight(module.conv1d, channels)
    conv = kernel(module, "causal_conv1d_fn")
    spans = document_spans(ctx)
    xc = per_document(lambda t: conv(t, weight, bias, activation=module.activation), [x], [2], 2, spans)
    xc = zero_padding(xc.transpose(1, 2), ctx.metadata.valid)  # [b, s, I/sp]

    # x_proj reads every channel of a token: back to sequence shards for the per-token projections.
    tokens = sequence_from_channels(xc.unsqueeze(-1), group)  # [b, s/sp, I]
    n, rank = module.ssm_state_size, module.time_step_rank
    time_step, B, C = module.x_proj(tokens).split([rank, n, n], dim=-1)
    time_step = module.dt_layernorm(time_step)
    B, C = module.b_layernorm(B), module.c_layernorm(C)
    dt = (module.dt_proj.weight @ time_step.transpose(1, 2)).transpose(1, 2)  # [b, s/sp, I], as the module
    B, C = (replicate_groups(t, 1, sp) for t in (B, C))  # every rank's channels read all of B and C
    dt, B, C = channels_from_sequence([dt, B, C], group)  # [b, I/sp, s], [b, N, s], [b, N, s]

    A = -torch.exp(module.A_log[channels].float())
    scan_fn = kernel(module, "mamba_selective_scan")
    delta_bias = module.dt_proj.bias[channels].float()
    D = module.D[channels].float()

    def scan(x: Tensor, dt: Tensor, B: Tensor, C: Tensor) -> Tensor:
        return scan_fn(x, dt, A, B, C, D=D, z=None, delta_bias=delta_bias, delta_softplus=True,
                       return_last_state=False, use_mambapy=module.use_mambapy,
                       use_associative_scan=module.use_associative_scan)

    y = per_document(scan, [xc.transpose(1, 2), dt, B, C], [2] * 4, 2, spans)  # [b, I/sp, s]
    y = sequence_from_channels(y.transpose(1, 2).unsqueeze(-1), group)  # [b, s/sp, I]
    # The gate is per token and channel: applied here, after the exchange, instead of inside the scan.
    y = y * F.silu(gate)
    return module.out_proj(y.to(dtype))


def mamba1_for(module: nn.Module) -> Mamba1SP | None:
    """A :class:`Mamba1SP` when ``module`` is a Mamba1 mixer of Jamba's form (not quantized)."""
    if forward_names(module) != JAMBA_FORM:
        return None
    needed = ("intermediate_size", "ssm_state_size", "time_step_rank", "activation", "A_log", "D", "in_proj", "x_proj",
              "dt_proj", "out_proj", "dt_layernorm", "b_layernorm", "c_layernorm", "use_mambapy",
              "use_associative_scan", "config")
    if not all(hasattr(module, a) for a in needed) or hasattr(module.config, "_is_quantized"):
        return None
    inter = module.intermediate_size
    conv = getattr(module, "conv1d", None)
    if not (isinstance(conv, nn.Conv1d) and conv.in_channels == conv.out_channels == conv.groups == inter):
        return None
    if module.in_proj.out_features != 2 * inter or module.dt_proj.bias is None:
        return None
    return Mamba1SP(module)

"""Mamba2 (state-space duality) layers under SP: Bamba, FalconH1, NemotronH, Zamba2, GraniteMoeHybrid,
Mamba2 and every model using the same mixer.

Per layer and rank (``H`` heads of width ``P`` sharing ``G`` groups of ``B``/``C`` of size ``N``)::

    hidden [b, s/sp, D] ──(padding zeroed, in_proj: per token)──▶ gate [b, s/sp, H·P]
                                                                 x [.., H·P] | B, C [.., G·N] | dt [.., H]
    all-to-all (x, B, C, dt in one): heads → ranks, sequence gathered
        ▶ x [b, H/sp·P, s]  B, C [b, G'/sp·N, s]  dt [b, H/sp, s]
    causal conv1d (this rank's channels), padding zeroed, chunked SSD scan on the FULL sequence, per document
    all-to-all back ▶ y [b, s/sp, H·P] ── gated (group) RMSNorm with the local gate, out_proj (per token)

The gate never travels: the gated norm is per token, so it runs after the exchange back (its
groups need not align with ``sp``). With ``sp > G`` each ``B``/``C`` group is replicated to the
``sp / G`` ranks whose heads read it. The scan is the model's own ``mamba2_chunk_scan`` (the
``mamba_ssm`` kernel where installed); the fused conv+scan+norm+out_proj kernel is not used, since
it would run on one chunk of the sequence.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..context import ForwardContext
from .common import (GroupSlice, channels_from_sequence, check_sp, depthwise_weight, document_spans, forward_names,
                     kernel, local_valid, no_cache, patch_forward, per_document, replicate_groups,
                     sequence_from_channels, shared_head_sp, zero_padding)

# What each supported forward reads (common.forward_names). The Bamba form (also NemotronH, Zamba2,
# GraniteMoeHybrid, Mamba2): apply_mask_to_padding_states → in_proj → causal_conv1d_fn → padding
# zeroed → mamba2_chunk_scan(D, dt_bias, softplus, time_step_limit) → norm(y, gate) → out_proj.
# The FalconH1 form adds ssm_in_multiplier before in_proj, mup_vector after it, and an optional norm
# (mamba_rms_norm; else y·silu(gate)).
BAMBA_FORM = frozenset({
    "A_log", "D", "activation", "apply_mask_to_padding_states", "bias", "causal_conv1d_fn", "causal_conv1d_update",
    "chunk_size", "conv1d", "conv_dim", "conv_kernel_size", "dt_bias", "dtype", "exp", "expand", "float",
    "get_conv_state", "get_recurrent_state", "head_dim", "in_proj", "intermediate_size", "is_recording_past",
    "layer_idx", "mamba2_chunk_scan", "mamba2_selective_state_update", "mamba2_split_conv1d_scan_combined", "n_groups",
    "norm", "num_heads", "out_proj", "reshape", "shape", "split", "squeeze", "ssm_state_size", "time_step_limit", "to",
    "torch", "training", "transpose", "update_conv_state", "update_recurrent_state", "variance_epsilon", "view",
    "weight"})
FALCON_H1_FORM = frozenset(BAMBA_FORM - {"reshape"} | {"float32", "functional", "mamba_rms_norm", "mup_vector", "nn",
                                                     "silu", "ssm_in_multiplier"})


class Mamba2SP:
    """:class:`~lightning_ulysses.models.mixers.MixerSP` for one Mamba2 mixer."""

    family = "Mamba2"

    def __init__(self, module: nn.Module) -> None:
        self.num_heads: int = module.num_heads
        self.n_groups: int = module.n_groups
        self.name = type(module).__name__

    def valid_sp(self) -> list[int]:
        return shared_head_sp(self.num_heads, self.n_groups)

    def check(self, sp: int) -> None:
        check_sp(sp, self.valid_sp(),
                 f"{self.name} (Mamba2: {self.num_heads} heads sharing {self.n_groups} B/C groups; sp must divide the "
                 "heads and divide or be a multiple of the groups)")

    def apply(self, module: nn.Module, get_context: Callable[[], ForwardContext | None]) -> Callable[[], None]:
        return patch_forward(module, _sp_forward, get_context)


def _is_falcon(module: nn.Module) -> bool:
    return hasattr(module, "mup_vector")


def _local_channels(module: nn.Module, part: GroupSlice, device: torch.device) -> Tensor:
    """Indices of this rank's conv channels in the module's ``[x | B | C]`` channel order."""
    p, n, inter = module.head_dim, module.ssm_state_size, module.intermediate_size
    (h0, nh), (g0, ng) = part.heads, part.groups
    x = torch.arange(h0 * p, (h0 + nh) * p, device=device)
    b = torch.arange(inter + g0 * n, inter + (g0 + ng) * n, device=device)
    return torch.cat([x, b, b + module.n_groups * n])


def _sp_forward(module: nn.Module, ctx: ForwardContext, hidden_states: Tensor, cache_params: Any = None,
                attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
    """The mixer's forward for ``hidden_states`` ``[b, s/sp, D]`` (this rank's chunk) under SP.

    Padding comes from the gathered metadata (``ctx.metadata.valid``), not ``attention_mask`` (the
    handle removed the chunk's mask from the model call); it is zeroed before ``in_proj`` and after
    the convolution, as the module does. Documents (``ctx.metadata.doc_ids``) run one by one.
    """
    no_cache(cache_params, module)
    sp, group = ctx.sp_size, ctx.group
    dtype = hidden_states.dtype
    hidden = zero_padding(hidden_states, local_valid(ctx))
    falcon = _is_falcon(module)
    if falcon:
        projected = module.in_proj(hidden * module.ssm_in_multiplier) * module.mup_vector
    else:
        projected = module.in_proj(hidden)
    inter, gn = module.intermediate_size, module.n_groups * module.ssm_state_size
    gate, x, B, C, dt = projected.split([inter, inter, gn, gn, module.num_heads], dim=-1)

    part = GroupSlice.of(module.num_heads, module.n_groups, sp, ctx.sp_rank)
    B, C = (replicate_groups(t, module.n_groups, part.replicate) for t in (B, C))
    x, B, C, dt = channels_from_sequence([x, B, C, dt], group)  # [b, c/sp, s]

    weight, bias = depthwise_weight(module.conv1d, _local_channels(module, part, x.device))
    conv = kernel(module, "causal_conv1d_fn")
    spans = document_spans(ctx)
    xbc = per_document(lambda t: conv(t, weight, bias, activation=module.activation),
                       [torch.cat([x, B, C], dim=1)], [2], 2, spans)
    xbc = zero_padding(xbc.transpose(1, 2), ctx.metadata.valid)  # [b, s, c]
    (h0, nh), ng = part.heads, part.groups[1]
    n, p = module.ssm_state_size, module.head_dim
    x, B, C = xbc.split([nh * p, ng * n, ng * n], dim=-1)
    bsz, seq = xbc.shape[:2]
    heads = slice(h0, h0 + nh)
    A = -torch.exp(module.A_log[heads].float())
    chunk_scan = kernel(module, "mamba2_chunk_scan")

    def scan(x: Tensor, dt: Tensor, B: Tensor, C: Tensor) -> Tensor:
        b, s = x.shape[:2]
        return chunk_scan(x.view(b, s, nh, p), dt, A, B.view(b, s, ng, n), C.view(b, s, ng, n),
                          chunk_size=module.chunk_size, D=module.D[heads], z=None, return_final_states=False,
                          dt_bias=module.dt_bias[heads], dt_softplus=True, initial_states=None,
                          dt_limit=module.time_step_limit)

    # dt [b, s, H/sp] contiguous, the layout the module hands its (possibly fused) scan kernel.
    y = per_document(scan, [x, dt.transpose(1, 2).contiguous(), B, C], [1] * 4, 1, spans)  # [b, s, H/sp, P]
    y = sequence_from_channels(y.reshape(bsz, seq, nh, p), group)  # [b, s/sp, H·P]

    if not falcon or module.mamba_rms_norm:
        y = module.norm(y, gate)
    else:
        y = y * F.silu(gate)
    return module.out_proj(y.to(dtype))


def mamba2_for(module: nn.Module) -> Mamba2SP | None:
    """A :class:`Mamba2SP` when ``module`` is a Mamba2 mixer of a form we run exactly."""
    names = forward_names(module)
    if names not in (BAMBA_FORM, FALCON_H1_FORM):
        return None
    needed = ("num_heads", "head_dim", "n_groups", "ssm_state_size", "intermediate_size", "conv_dim", "chunk_size",
              "time_step_limit", "activation", "A_log", "D", "dt_bias", "norm", "in_proj", "out_proj")
    if not all(hasattr(module, a) for a in needed):
        return None
    if names == FALCON_H1_FORM and not all(hasattr(module, a) for a in ("mup_vector", "ssm_in_multiplier",
                                                                          "mamba_rms_norm")):
        return None
    inter, gn = module.intermediate_size, module.n_groups * module.ssm_state_size
    conv = getattr(module, "conv1d", None)
    if not (isinstance(conv, nn.Conv1d) and conv.in_channels == conv.out_channels == conv.groups == inter + 2 * gn):
        return None
    if module.num_heads * module.head_dim != inter or module.num_heads % module.n_groups:
        return None
    if module.in_proj.out_features != 2 * inter + 2 * gn + module.num_heads:
        return None
    return Mamba2SP(module)

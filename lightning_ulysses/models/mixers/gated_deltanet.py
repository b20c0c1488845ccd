"""Gated delta-net (linear attention) layers under SP: Qwen3-Next, Qwen3.5 and every model using
the same module.

Per layer and rank (``sp`` ranks, ``Hv`` value heads reading ``Hk`` key heads)::

    hidden [b, s/sp, D] ──(padding zeroed, in_proj*: per token)──▶ q, k [b, s/sp, Hk·dk]  v [b, s/sp, Hv·dv]
                                                                  b, a [b, s/sp, Hv]      z [b, s/sp, Hv·dv]
    all-to-all (q, k, v, b, a in one): heads → ranks, sequence gathered
        ▶ q, k [b, Hk'/sp·dk, s]  v [b, Hv/sp·dv, s]  b, a [b, Hv/sp, s]
    causal conv1d (this rank's channels) and the gated delta rule on the FULL sequence, per document
    all-to-all back ▶ out [b, s/sp, Hv·dv] ── gated RMSNorm with the local z, out_proj (per token)

The gate ``z`` never travels: the norm is per token and per head, so it runs after the exchange
back. With ``sp > Hk`` each key head is replicated to the ``sp / Hk`` ranks whose value heads read
it (as the attention path replicates KV heads).
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

# What the forward of each supported layout reads (see common.forward_names). Both run
# apply_mask_to_padding_states → in_proj* → causal_conv1d_fn → torch_chunk_gated_delta_rule
# (l2-normalised q/k) → norm(out, z) → out_proj, differing only in how the projections are laid out.
_CACHE_NAMES = {"get_conv_state", "get_recurrent_state", "is_recording_past", "update_conv_state",
                "update_recurrent_state", "causal_conv1d_update", "torch_recurrent_gated_delta_rule", "layer_idx",
                "conv_kernel_size", "pop"}
_COMMON = {"A_log", "F", "activation", "apply_mask_to_padding_states", "bias", "causal_conv1d_fn", "conv1d", "dt_bias",
           "exp", "float", "head_k_dim", "head_v_dim", "key_dim", "norm", "out_proj", "reshape", "shape", "sigmoid",
           "softplus", "split", "squeeze", "torch", "torch_chunk_gated_delta_rule", "transpose", "value_dim", "weight"}
FUSED_QKVZ = frozenset(_COMMON | _CACHE_NAMES | {"cat", "fix_query_key_value_ordering", "in_proj_ba", "in_proj_qkvz"})
SPLIT_QKV = frozenset(_COMMON | _CACHE_NAMES | {"in_proj_a", "in_proj_b", "in_proj_qkv", "in_proj_z"})


def _is_depthwise(conv: Any, channels: int) -> bool:
    return isinstance(conv, nn.Conv1d) and conv.in_channels == conv.out_channels == conv.groups == channels


def _projections(module: nn.Module, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-token projections, exactly as the module's forward computes them.

    Returns:
        q, k ``[b, s/sp, Hk·dk]``, v ``[b, s/sp, Hv·dv]``, z ``[b, s/sp, Hv, dv]``, b, a ``[b, s/sp, Hv]``.
    """
    bsz, seq = hidden.shape[:2]
    if hasattr(module, "in_proj_qkvz"):
        q, k, v, z, b, a = module.fix_query_key_value_ordering(module.in_proj_qkvz(hidden), module.in_proj_ba(hidden))
        q, k, v = (x.reshape(bsz, seq, -1) for x in (q, k, v))
        return q, k, v, z, b, a
    q, k, v = module.in_proj_qkv(hidden).split([module.key_dim, module.key_dim, module.value_dim], dim=-1)
    z = module.in_proj_z(hidden).reshape(bsz, seq, -1, module.head_v_dim)
    return q, k, v, z, module.in_proj_b(hidden), module.in_proj_a(hidden)


class GatedDeltaNetSP:
    """:class:`~lightning_ulysses.models.mixers.MixerSP` for one gated delta-net module."""

    family = "gated delta-net"

    def __init__(self, module: nn.Module) -> None:
        self.num_v_heads: int = module.num_v_heads
        self.num_k_heads: int = module.num_k_heads
        self.name = type(module).__name__

    def valid_sp(self) -> list[int]:
        return shared_head_sp(self.num_v_heads, self.num_k_heads)

    def check(self, sp: int) -> None:
        check_sp(sp, self.valid_sp(),
                 f"{self.name} (gated delta-net: {self.num_v_heads} value heads reading {self.num_k_heads} key heads; "
                 "sp must divide the value heads and divide or be a multiple of the key heads)")

    def apply(self, module: nn.Module, get_context: Callable[[], ForwardContext | None]) -> Callable[[], None]:
        return patch_forward(module, _sp_forward, get_context)


def _local_channels(module: nn.Module, part: GroupSlice, device: torch.device) -> Tensor:
    """Indices of this rank's conv channels in the module's ``[q | k | v]`` channel order."""
    dk, dv, kd = module.head_k_dim, module.head_v_dim, module.key_dim
    (k0, nk), (v0, nv) = part.groups, part.heads
    q = torch.arange(k0 * dk, (k0 + nk) * dk, device=device)
    return torch.cat([q, q + kd, torch.arange(2 * kd + v0 * dv, 2 * kd + (v0 + nv) * dv, device=device)])


def _sp_forward(module: nn.Module, ctx: ForwardContext, hidden_states: Tensor, cache_params: Any = None,
                attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
    """The module's forward for ``hidden_states`` ``[b, s/sp, D]`` (this rank's chunk) under SP.

    Padding comes from the gathered metadata (``ctx.metadata.valid``), not ``attention_mask``: the
    handle removed the chunk's mask from the model call. Documents (``ctx.metadata.doc_ids``) are run
    one by one, so state and convolution start from zero at every document start.
    """
    no_cache(cache_params, module)
    sp, group = ctx.sp_size, ctx.group
    hidden = zero_padding(hidden_states, local_valid(ctx))
    q, k, v, z, b, a = _projections(module, hidden)

    part = GroupSlice.of(module.num_v_heads, module.num_k_heads, sp, ctx.sp_rank)
    q, k = (replicate_groups(x, module.num_k_heads, part.replicate) for x in (q, k))
    q, k, v, b, a = channels_from_sequence([q, k, v, b, a], group)  # [b, c/sp, s]

    # Causal depthwise convolution of this rank's q/k/v channels over the full sequence.
    v0, nv = part.heads
    channels = _local_channels(module, part, q.device)
    weight, bias = depthwise_weight(module.conv1d, channels)
    conv = kernel(module, "causal_conv1d_fn")
    spans = document_spans(ctx)
    mixed = per_document(lambda x: conv(x, weight, bias, activation=module.activation),
                         [torch.cat([q, k, v], dim=1)], [2], 2, spans)
    mixed = mixed.transpose(1, 2)  # [b, s, c]
    nk = part.groups[1]
    q, k, v = mixed.split([nk * module.head_k_dim, nk * module.head_k_dim, nv * module.head_v_dim], dim=-1)
    bsz, seq = mixed.shape[:2]
    q = q.reshape(bsz, seq, nk, module.head_k_dim)
    k = k.reshape(bsz, seq, nk, module.head_k_dim)
    v = v.reshape(bsz, seq, nv, module.head_v_dim)

    heads = slice(v0, v0 + nv)
    # [b, s, Hv/sp] contiguous, the layout the module hands its (possibly fused) kernel.
    b, a = b.transpose(1, 2).contiguous(), a.transpose(1, 2).contiguous()
    beta = b.sigmoid()
    g = -module.A_log[heads].float().exp() * F.softplus(a.float() + module.dt_bias[heads])

    rule = kernel(module, "torch_chunk_gated_delta_rule")

    def scan(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor) -> Tensor:
        return rule(q, k, v, g=g, beta=beta, initial_state=None, output_final_state=False,
                    use_qk_l2norm_in_kernel=True)[0]

    out = per_document(scan, [q, k, v, g, beta], [1] * 5, 1, spans)  # [b, s, Hv/sp, dv]

    out = sequence_from_channels(out, group).reshape(z.shape)  # [b, s/sp, Hv, dv]
    out = module.norm(out.reshape(-1, module.head_v_dim), z.reshape(-1, module.head_v_dim))
    return module.out_proj(out.reshape(hidden.shape[0], hidden.shape[1], -1))


def gated_deltanet_for(module: nn.Module) -> GatedDeltaNetSP | None:
    """A :class:`GatedDeltaNetSP` when ``module`` is a gated delta-net of a layout we run exactly."""
    names = forward_names(module)
    if names not in (FUSED_QKVZ, SPLIT_QKV):
        return None
    needed = ("num_v_heads", "num_k_heads", "head_k_dim", "head_v_dim", "key_dim", "value_dim", "A_log", "dt_bias",
              "norm", "out_proj", "activation")
    if not all(hasattr(module, n) for n in needed):
        return None
    if module.num_v_heads % module.num_k_heads:
        return None
    if not _is_depthwise(getattr(module, "conv1d", None), 2 * module.key_dim + module.value_dim):
        return None
    return GatedDeltaNetSP(module)

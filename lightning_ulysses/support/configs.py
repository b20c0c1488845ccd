"""Tiny random configs for every architecture transformers registers for causal / masked LM.

Built automatically from each config class's defaults: sizes shrunk, dropout off, token ids inside
the tiny vocabulary. An architecture whose tiny config cannot be built is reported as untestable,
with the error, never skipped silently.
"""

from __future__ import annotations

import re
from typing import Any

import torch

VOCAB = 128
HIDDEN = 64
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 16
MAX_PARAMS = 3_000_000
# float64: a structural error stands out by orders of magnitude, and models whose arithmetic cancels
# (differential attention) do not blur the verdict with float32 rounding.
DTYPE = torch.float64
WINDOW = 8  # shorter than the test sequence, so windows really cut

# name -> value, applied when the default config has the attribute.
_EXACT = {
    "vocab_size": VOCAB, "hidden_size": HIDDEN, "d_model": HIDDEN, "n_embd": HIDDEN, "embed_dim": HIDDEN,
    "num_attention_heads": HEADS, "n_head": HEADS, "num_heads": HEADS, "n_heads": HEADS,
    "encoder_attention_heads": HEADS, "decoder_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS, "n_kv_heads": KV_HEADS, "num_kv_heads": KV_HEADS,
    "head_dim": HEAD_DIM, "attention_head_dim": HEAD_DIM,
    "intermediate_size": 64, "ffn_dim": 64, "n_inner": 64, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
    "intermediate_size_mlp": 64, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
    "expert_intermediate_size": 32, "ffn_hidden_size": 64,
    "num_local_experts": 4, "num_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "top_k": 2, "moe_k": 2,
    "n_group": 1, "topk_group": 1, "num_shared_experts": 1, "n_shared_experts": 1,
    "first_k_dense_replace": 1, "num_dense_layers": 1,
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": HEAD_DIM, "qk_nope_head_dim": 8, "v_head_dim": 8,
    "index_head_dim": 16, "index_n_heads": 2, "index_topk": 16,
    "max_position_embeddings": 256, "n_positions": 256, "n_ctx": 256, "max_seq_len": 256,
    "sliding_window": WINDOW, "attention_chunk_size": WINDOW, "local_attention": WINDOW,
    "num_nextn_predict_layers": 0, "num_kv_shared_layers": 0, "mtp_num_hidden_layers": 0,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "sep_token_id": 2, "cls_token_id": 1,
    "mask_token_id": 3, "decoder_start_token_id": 1,
    "rotary_dim": 8, "partial_rotary_dim": 8,
    "type_vocab_size": 2, "embedding_size": HIDDEN,
}
# Keys whose default None means "derive from the sizes", safe to set explicitly.
_NONE_OK = ("sliding_window", "head_dim", "num_key_value_heads", "num_experts_per_tok")
_SIZE_NAME = re.compile(r"(_size|_dim|_rank|_heads|_experts|_length)$")


def tiny_config_kwargs(defaults: dict[str, Any]) -> dict[str, Any]:
    """Overrides that make a default config tiny; ``defaults`` is ``config.to_dict()``."""
    out: dict[str, Any] = {}
    for key, value in defaults.items():
        if key in _EXACT and (value is None or isinstance(value, (int, float))) and not isinstance(value, bool):
            if value is not None or key in _NONE_OK:
                out[key] = _EXACT[key]
        elif isinstance(value, dict) and "model_type" in value:  # a sub-config (text / vision tower)
            out[key] = {**value, **tiny_config_kwargs(value)}
        elif isinstance(value, float) and not isinstance(value, bool) and "drop" in key:
            out[key] = 0.0
        elif key in ("layerdrop", "encoder_layerdrop", "decoder_layerdrop", "router_jitter_noise", "input_jitter_noise"):
            out[key] = 0.0
        elif isinstance(value, int) and not isinstance(value, bool) and _SIZE_NAME.search(key) and value > 64:
            out[key] = 16
    if "qk_head_dim" in defaults and "qk_nope_head_dim" in out:  # MLA: q/k = nope + rope parts
        out["qk_head_dim"] = out["qk_nope_head_dim"] + out.get("qk_rope_head_dim", 0)
    if "kv_lora_rank" in defaults and "num_key_value_heads" in out:  # MLA expands K/V to every head
        out["num_key_value_heads"] = out.get("num_attention_heads", HEADS)
    layers = defaults.get("num_hidden_layers") or defaults.get("n_layer") or defaults.get("num_layers")
    n = _tiny_layer_count(defaults, layers)
    for key in ("num_hidden_layers", "n_layer", "num_layers", "decoder_layers", "encoder_layers"):
        if isinstance(defaults.get(key), int):
            out[key] = n
    for key, value in defaults.items():
        if isinstance(value, list) and layers and len(value) == layers:
            out[key] = _pick_layers(value, n)
    if isinstance(out.get("intermediate_size"), int) and isinstance(defaults.get("intermediate_size"), list):
        out["intermediate_size"] = [64] * n
    # Hybrids place attention by period / index: keep one attention layer among the tiny ones.
    if "attn_layer_period" in defaults:
        out.update(attn_layer_period=2, attn_layer_offset=1)
    if "attn_layer_indices" in defaults:
        out["attn_layer_indices"] = [1]
    if "attention_hidden_size" in defaults:  # Zamba: attention reads [hidden, original hidden] concatenated
        out.update(attention_hidden_size=2 * HIDDEN, attention_head_dim=2 * HIDDEN // HEADS)
    if isinstance(defaults.get("intermediate_size"), list):
        out["intermediate_size"] = [64] * n
    return out


def _tiny_layer_count(defaults: dict[str, Any], layers: int | None) -> int:
    """Enough layers to contain every layer type the config declares (at most 6), else 2."""
    types = defaults.get("layer_types")
    if isinstance(types, list) and types:
        seen: list[Any] = []
        last_new = 0
        for i, t in enumerate(types):
            if t not in seen:
                seen.append(t)
                last_new = i
        return min(max(2, last_new + 1), 6)
    return 2


def _pick_layers(values: list[Any], n: int) -> list[Any]:
    types = list(dict.fromkeys(map(repr, values)))
    picked = values[:n]
    if len(set(map(repr, picked))) < len(types):  # every kind of layer at least once
        first = {repr(v): v for v in reversed(values)}
        picked = [first[t] for t in types][:n]
        picked += values[: n - len(picked)]
    return picked


# Architectures whose default config cannot build a working model, or whose settings sit in
# parameter-group sub-configs the generic shrinking does not reach (DBRX: its default attn_config
# has no rope_theta and clips q/k/v with None, which torch.clamp rejects).
_ARCH_OVERRIDES: dict[str, dict[str, Any]] = {
    "dbrx": {"n_layers": 2, "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
             "ffn_config": {"hidden_size": HIDDEN, "ffn_hidden_size": 64, "moe_num_experts": 4, "moe_top_k": 2}},
}


def keep_head_layout(config: dict[str, Any]) -> dict[str, Any]:
    """Tiny head counts with ``config``'s query/KV head ratio (``config`` is a full-size
    ``config.to_dict()``): multi-head stays multi-head, GQA keeps its group size, MQA its single KV
    head. Empty when the config has no such pair of counts (the generic 4 / 2 then apply)."""
    heads, kv = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if not (isinstance(heads, int) and isinstance(kv, int)) or isinstance(heads, bool) or kv <= 0 or heads % kv:
        return {}
    ratio = heads // kv
    if ratio == 1:  # multi-head
        return {"num_attention_heads": HEADS, "num_key_value_heads": HEADS}
    if kv == 1:  # multi-query
        return {"num_attention_heads": HEADS, "num_key_value_heads": 1}
    return {"num_attention_heads": KV_HEADS * ratio, "num_key_value_heads": KV_HEADS}


def normalised_config(model_type: str, base: dict[str, Any] | None) -> dict[str, Any] | None:
    """``base`` (a checkpoint's config.json) as its config class writes it: every sub-config
    (``text_config``, ``vision_config``) with its ``model_type``, which checkpoints often leave out
    and which :func:`tiny_config_kwargs` recognises sub-configs by."""
    if base is None:
        return None
    from transformers import AutoConfig

    return type(AutoConfig.for_model(model_type)).from_dict(base).to_dict()


def build_tiny(model_type: str, model_cls_name: str, attn: str | None = None, seed: int = 0,
               dtype: torch.dtype = DTYPE, base: dict[str, Any] | None = None, **extra: Any):
    """Build ``model_cls_name`` from a tiny config of ``model_type`` (``dtype``, fixed seed).

    ``base`` (a ``config.to_dict()``, e.g. a checkpoint's config.json) is shrunk instead of the
    config class's defaults, keeping its head layout ratio (:func:`keep_head_layout`) and its other
    settings (RoPE parameters, layer types, windows, MoE routing)."""
    import torch
    import transformers
    from transformers import AutoConfig

    base = normalised_config(model_type, base)
    defaults = AutoConfig.for_model(model_type).to_dict() if base is None else base
    kwargs = tiny_config_kwargs(defaults)
    if base is not None:
        kwargs.update(keep_head_layout(base))
    if "output_router_logits" in defaults:  # MoE: the load-balancing loss is part of what is compared
        kwargs["output_router_logits"] = True
    kwargs.update(_ARCH_OVERRIDES.get(model_type, {}))
    kwargs.update(extra)
    if base is None:
        config = AutoConfig.for_model(model_type, **kwargs)
    else:
        config = type(AutoConfig.for_model(model_type)).from_dict({**base, **kwargs})
    cls = getattr(transformers, model_cls_name)
    if attn is None:
        attn = "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"
    config._attn_implementation = attn
    with torch.device("meta"):
        size = sum(p.numel() for p in cls(config).parameters())
    if size > MAX_PARAMS:
        raise TinyConfigError(f"the shrunk config still has {size:,} parameters")
    torch.manual_seed(seed)
    model = cls(config).to(dtype)
    return model


class TinyConfigError(RuntimeError):
    """The architecture's default config could not be shrunk into a tiny test model."""

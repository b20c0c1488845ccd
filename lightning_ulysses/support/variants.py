"""The support matrix's configuration axis: each architecture with the settings long-context users
change, not only its default tiny config.

Per architecture (only those exact with their default config; a refused model stays refused):

- ``rope:<type>`` for every RoPE type in :data:`ROPE_TYPES` its config accepts, with the sequence
  (32 tokens) past the scaling threshold (16): ``longrope`` switches to its long factors and
  ``dynamic`` rescales, both decided from the whole sequence's length;
- ``window:24``: a sliding window longer than one SP chunk (the default tiny config's window, 8,
  is shorter than a chunk);
- ``token_type_ids``: segment ids, where the model takes them;
- ``packed+padded``: causal rows packed with restarting ``position_ids``, the last one padded as its
  own pseudo-document (no ``attention_mask``), as ``pack_documents`` and HF's
  ``DataCollatorWithFlattening`` make them.

A variant whose setting the model ignores (its rotary embedding has no such type, it has no
window) is reported ``untestable`` with that reason rather than counted as exact.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from .parity import RTOL, SEQ, Verdict, _call, _inputs, _short, compare
from .configs import build_tiny, tiny_config_kwargs

ROPE_TYPES = ("linear", "dynamic", "yarn", "longrope", "llama3")
THRESHOLD = 16  # positions the scaled RoPE types were "trained" on: below SEQ, so scaling engages
LONG_WINDOW = 24  # longer than a chunk at sp=2 (16 tokens)


class NotApplicable(Exception):
    """The variant does not apply to this architecture (reported as untestable, with the reason)."""


def variants_for(arch: str, head: str, cls: str) -> list[str]:
    """The configuration rows that apply to ``arch`` (from its default config and forward)."""
    import transformers
    from transformers import AutoConfig

    defaults = AutoConfig.for_model(arch).to_dict()
    out = []
    if isinstance(defaults.get("rope_parameters"), dict) and defaults["rope_parameters"]:
        out += [f"rope:{t}" for t in ROPE_TYPES]
    if "sliding_window" in defaults:
        out.append(f"window:{LONG_WINDOW}")
    forward = inspect.signature(getattr(transformers, cls).forward).parameters
    if "token_type_ids" in forward and (defaults.get("type_vocab_size") or 0) > 1:
        out.append("token_type_ids")
    if head == "causal":
        out.append("packed+padded")
    return out


def _rope_dims(config: Any, params: dict[str, Any]) -> int:
    """Rotated dimensions per head (what longrope's factor lists are indexed by, halved)."""
    head_dim = (getattr(config, "qk_rope_head_dim", None) or getattr(config, "head_dim", None)
                or config.hidden_size // config.num_attention_heads)
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0)
    return int(head_dim * partial)


def _rope_kwargs(arch: str, rope_type: str) -> dict[str, Any]:
    from transformers import AutoConfig

    defaults = AutoConfig.for_model(arch).to_dict()
    tiny = AutoConfig.for_model(arch, **tiny_config_kwargs(defaults))
    current = tiny.rope_parameters
    nested = all(isinstance(v, dict) for v in current.values())

    def scaled(params: dict[str, Any]) -> dict[str, Any]:
        keep = {k: v for k, v in params.items() if k in ("rope_theta", "partial_rotary_factor", "mrope_section",
                                                         "mrope_interleaved")}
        half = _rope_dims(tiny, params) // 2
        extra: dict[str, Any] = {
            "linear": {"factor": 2.0},
            "dynamic": {"factor": 2.0},
            "yarn": {"factor": 4.0, "original_max_position_embeddings": THRESHOLD, "beta_fast": 32.0, "beta_slow": 1.0},
            "longrope": {"original_max_position_embeddings": THRESHOLD,
                         "short_factor": [1.0 + 0.05 * i for i in range(half)],
                         "long_factor": [2.0 + 0.5 * i for i in range(half)]},
            "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": THRESHOLD},
        }[rope_type]
        return {**keep, "rope_type": rope_type, **extra}

    kwargs: dict[str, Any] = {"rope_parameters": {k: scaled(v) for k, v in current.items()} if nested
                              else scaled(current)}
    if rope_type == "dynamic":
        kwargs["max_position_embeddings"] = THRESHOLD  # dynamic NTK rescales past this length
    if "original_max_position_embeddings" in defaults:  # Phi-3 keeps it on the config as well
        kwargs["original_max_position_embeddings"] = THRESHOLD
    return kwargs


def _config_kwargs(arch: str, variant: str) -> dict[str, Any]:
    if variant.startswith("rope:"):
        return _rope_kwargs(arch, variant.split(":", 1)[1])
    if variant.startswith("window:"):
        from transformers import AutoConfig

        defaults = AutoConfig.for_model(arch).to_dict()
        kwargs: dict[str, Any] = {"sliding_window": LONG_WINDOW}
        if "use_sliding_window" in defaults:
            kwargs["use_sliding_window"] = True
        if "max_window_layers" in defaults:  # Qwen2-style: layers from this index on are windowed
            kwargs["max_window_layers"] = 0
        if isinstance(defaults.get("layer_types"), list) and "max_window_layers" in defaults:
            kwargs["layer_types"] = None  # derived again from the window settings above
        return kwargs
    return {}


def _took_effect(model: torch.nn.Module, variant: str) -> str | None:
    """Why ``model`` ignores the variant's setting (None: it uses it)."""
    if variant.startswith("rope:"):
        want = variant.split(":", 1)[1]
        for m in model.modules():
            got = getattr(m, "rope_type", None)
            if got == want or (isinstance(got, dict) and want in got.values()):
                return None
        return f"the model's rotary embedding does not take rope_type {want!r}"
    if variant.startswith("window:"):
        if any(getattr(m, "sliding_window", None) == LONG_WINDOW for m in model.modules()):
            return None
        # Most models read the window from the config at call time: then the logits must differ
        # from the same weights under the default tiny window (8).
        arch, cls = model.config.model_type, type(model).__name__
        default = build_tiny(arch, cls, dtype=next(model.parameters()).dtype)
        batch = _inputs("causal", False)
        with torch.no_grad():
            same = torch.equal(_call(model, batch).logits, _call(default, batch).logits)
        return "no attention layer uses config.sliding_window" if same else None
    return None


def _packed_batch(head: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Two packed rows of SEQ tokens: documents 10 + 14 + 8 padding tokens (their own pseudo-document,
    no mask), and 20 + 12; labels ignore each document's first token and the padding."""
    batch = _inputs(head, False)
    docs = [[10, 14, 8], [20, 12]]
    position_ids = torch.cat([torch.cat([torch.arange(n) for n in row])[None] for row in docs])
    real = torch.ones(2, SEQ)
    real[0, 24:] = 0
    labels = batch["input_ids"].clone()
    labels[position_ids == 0] = -100
    labels[real == 0] = -100
    ids = batch["input_ids"].masked_fill(real == 0, 0)
    return {"input_ids": ids, "labels": labels, "position_ids": position_ids}, real


def _batch(head: str, variant: str) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    if variant == "packed+padded":
        return _packed_batch(head)
    batch = _inputs(head, False)
    if variant == "token_type_ids":
        types = torch.zeros_like(batch["input_ids"])
        types[0, SEQ // 2:] = 1  # the second segment starts in the second chunk
        types[1, 5:] = 1
        batch["token_type_ids"] = types
    return batch, None


def _keeps_documents_apart(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> bool:
    """Whether the untouched model, given the packed rows, treats the second row's second document
    as if it were alone (the check behind a refusal of packed rows: it must be true)."""
    ids, pos = batch["input_ids"][1:], batch["position_ids"][1:]
    start = int((pos[0] == 0).nonzero()[1])
    with torch.no_grad():
        packed = _call(model, {"input_ids": ids, "position_ids": pos}).logits[0, start:]
        alone = _call(model, {"input_ids": ids[:, start:], "position_ids": pos[:, start:]}).logits[0]
    return bool((packed - alone).norm() <= 1e-4 * alone.norm())


def classify_variant(arch: str, head: str, cls: str, variant: str, sp_group: Any, dtype: str = "float64",
                     eval_mode: bool = False) -> Verdict:
    """One configuration row: exact / wrong / refused / untestable / foreign, as :func:`classify`,
    in the ``dtype`` and mode the architecture's default config was compared in."""
    row = Verdict(arch, head, cls, "", variant=variant)

    def verdict(kind: str, reason: str = "", details: dict[str, float] | None = None) -> Verdict:
        return Verdict(arch, head, cls, kind, reason, details or {}, variant=variant)

    try:
        kwargs = _config_kwargs(arch, variant)
        ref = build_tiny(arch, cls, dtype=getattr(torch, dtype), **kwargs)
        model = build_tiny(arch, cls, dtype=getattr(torch, dtype), **kwargs)
    except Exception as e:  # noqa: BLE001
        return verdict("untestable", f"the config does not take this setting: {_short(e)}"[:300])
    ignored = _took_effect(ref, variant)
    if ignored:
        return verdict("untestable", ignored)
    if eval_mode:
        ref.eval()
        model.eval()
    batch, real = _batch(head, variant)
    result = compare(ref, model, batch, variant, sp_group, row, real=real)
    if isinstance(result, Verdict):
        if variant == "packed+padded" and result.verdict == "refused" and _keeps_documents_apart(ref, batch):
            return verdict("wrong", f"refused packed rows that the non-SP model keeps apart: {result.reason}"[:300])
        return result
    bad = {k: v for k, v in result.items() if not v <= RTOL}
    if bad:
        worst = max(bad, key=bad.get)
        return verdict("wrong", f"{worst} relative error {bad[worst]:.2e}", result)
    return verdict("exact", "compared in eval mode" if eval_mode else "", result)

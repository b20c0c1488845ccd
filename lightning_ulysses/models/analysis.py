"""Which models Ulysses SP computes exactly, decided from the model's structure before any forward.

Ulysses is exact for a model when everything that mixes tokens runs on the full sequence after the
exchange and everything else is per token (README, "Supported models"). :func:`analyse_model` walks
the model once, at ``apply_ulysses`` time, and either returns a :class:`ModelPlan` — what the handle
must do to stay exact (which objective, how positions are derived, which per-head parameters the
attention backend reads, which MoE auxiliary loss to make global, which non-attention mixers to
exchange) — or raises :class:`UnsupportedModelError` naming the module and the reason.

The rules look at structure (module types, parameters, what each ``forward`` calls), not at a list
of architectures, so a new model built from known parts is handled without a code change:

* attention must be dispatched through transformers' ``AttentionInterface`` (each attention
  module's ``forward`` looks its backend up in ``ALL_ATTENTION_FUNCTIONS``; a model class from
  outside transformers must also declare ``_supports_attention_backend``);
* any other token mixer — a convolution over the sequence, a scan or recurrence, attention or
  linear attention computed inline, an FFT — must have an SP implementation in
  :mod:`lightning_ulysses.models.mixers`, else the model is refused;
* the attention mask must come from transformers' ``masking_utils`` (so the handle can rebuild it
  for the full sequence from the gathered padding and positions), and positions must be injectable;
* loss terms must be ones the handle can make global (the causal / masked LM loss, the MoE
  load-balancing loss of the model's own file).
"""

from __future__ import annotations

import inspect
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from torch import nn

from ..parallel.attention import HeadLayout
from .mixers import MixerSP, mixers_valid_sp, refusal_reason, sp_mixer_for
from .moe import AuxLossPlan
from .multimodal import CompositeParts, composite_objective, composite_parts
from .source import source_of as _source
from .whole_sequence import cache_argument, is_position_module, reads_cache_length


class UnsupportedModelError(ValueError):
    """The model (or one of its modules) cannot be run exactly under Ulysses SP; the message names
    the module and the reason."""


Objective = Literal["causal", "masked"]
Positions = Literal["arange", "from_mask", "from_input_ids"]


@dataclass
class ModelPlan:
    """What :class:`~lightning_ulysses.models.apply.UlyssesHandle` must do to keep one model exact.

    Attributes:
        objective: ``"causal"`` (targets shifted on the full sequence), ``"masked"`` (targets at
            their own positions) or ``None`` for a model without an LM head (no labels accepted).
        loss_in_forward: the model's ``forward`` computes its LM loss through
            ``self.loss_function`` (replaced by the exact SP loss); otherwise the handle takes the
            labels out of the call and computes the loss from the returned logits.
        positions: how the model derives positions it is not given: ``arange`` over the sequence,
            ``from_mask`` (cumulative sum of the padding mask) or ``from_input_ids`` (cumulative
            count of non-padding tokens, offset by ``padding_idx``).
        padding_idx: the embedding padding index for ``from_input_ids``.
        attention: names of the modules that dispatch through ``AttentionInterface``.
        per_head: attention module name → names of its own parameters indexed by query head, with
            the dimension that indexes heads; sliced to this rank's heads after the exchange.
        mixers: ``(name, module, implementation)`` for non-attention token mixers run under SP.
        windows: attention module name → the sliding window its mask has although the module does
            not pass ``sliding_window`` to the backend (the model builds a sliding-window mask for
            every layer from ``config.sliding_window``).
        chunks: attention module name → its chunked-local-attention size (``attention_chunk_size``,
            on the layers ``config.layer_types`` marks ``"chunked_attention"``).
        aux_loss: how to recompute the model's MoE load-balancing loss over the whole sequence, when
            the model adds one to its loss (``None`` also when its call cannot be reproduced: then
            requesting router logits is refused).
        aux_refused: the model adds an auxiliary loss that ``aux_loss`` cannot reproduce; a forward
            that asks for router logits is refused.
        position_modules: parameter-free modules fed ``position_ids`` (rotary embeddings), run on the
            whole sequence's positions (:mod:`.whole_sequence`).
        offset_modules: attention modules numbering their tokens from the cache length, given the
            chunk's global offset (:mod:`.whole_sequence`).
        dropout: modules that draw random numbers in training (dropout ``p > 0``), by name.
        splits_packed_rows: the model itself keeps packed documents apart (its masks are causal and
            built from ``position_ids``, which transformers scans for restarts when no mask is
            given); otherwise the non-SP model attends across them and SP refuses packed rows
            unless ``packed_documents="split"``.
        composite: for a vision-language model, its language model (which every other field
            describes, by names inside the whole model) and what the outer model reads on the whole
            row (:mod:`.multimodal`); ``None`` for a single model.
    """

    objective: Objective | None
    loss_in_forward: bool
    positions: Positions = "arange"
    padding_idx: int | None = None
    attention: list[str] = field(default_factory=list)
    per_head: dict[str, dict[str, int]] = field(default_factory=dict)
    mixers: list[tuple[str, nn.Module, MixerSP]] = field(default_factory=list)
    windows: dict[str, int] = field(default_factory=dict)
    chunks: dict[str, int] = field(default_factory=dict)
    aux_loss: AuxLossPlan | None = None
    aux_refused: bool = False
    position_modules: list[str] = field(default_factory=list)
    offset_modules: list[str] = field(default_factory=list)
    dropout: list[str] = field(default_factory=list)
    splits_packed_rows: bool = True
    composite: CompositeParts | None = None


_MASK_BUILDERS = re.compile(r"create_(causal|bidirectional|sliding_window_causal|bidirectional_sliding_window"
                            r"|chunked_causal)_mask"
                            r"|create_masks_for_generate")
_UNSUPPORTED_MASKS = {
    "create_recurrent_attention_mask": "a recurrent attention mask",
}
_INLINE_PRODUCT = re.compile(r"torch\.matmul|torch\.bmm|torch\.einsum|\.matmul\(|\.bmm\(| @ ")
_QUERY_KEY = re.compile(r"\bquery|\bq_|\bkey|\bk_|\bq\b|\bk\b")
_SEQUENCE_OPS = {
    "fft": "an FFT over the sequence",
    "cumsum": "a cumulative sum over tokens",
    "cumprod": "a cumulative product over tokens",
    "logcumsumexp": "a cumulative reduction over tokens",
    "torch.roll": "a shift along the sequence",
    "selective_scan": "a state-space scan",
    "chunk_gated_delta_rule": "a linear-attention recurrence",
    "recurrent_gated_delta_rule": "a linear-attention recurrence",
}
# An assignment statement (keyword arguments are written without spaces around "=").
_MASK_REBOUND = re.compile(r"^\s*attention_mask\s+=\s+(?!=|encoder_attention_mask)", re.MULTILINE)
_SEQUENCE_SHIFT = re.compile(r"\[:,\s*1:\]|\[:,\s*:-1\]")
_SSM_PARAMETERS = ("A_log", "dt_bias", "time_decay", "time_first")


def _forward_source(module: nn.Module) -> str:
    """Source of the ``forward`` the module's class runs (nearest override), '' for torch's own."""
    fn = type(module).forward
    if getattr(fn, "__module__", "").startswith("torch."):
        return ""
    return _source(fn)


def _passes_own_mask(module: nn.Module) -> bool:
    """True when the module hands the backend a mask other than the one it was given."""
    import ast
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(_forward_source(module)))
    except SyntaxError:
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("attention_interface"):
            given = [k.value for k in node.keywords if k.arg == "attention_mask"]
            given += node.args[4:5]
            if any(ast.unparse(g) not in ("attention_mask", "None") for g in given):
                return True
    return False


def dispatches_attention(module: nn.Module) -> bool:
    """True when the module's forward looks its attention backend up in ``AttentionInterface``."""
    src = _forward_source(module)
    return "ALL_ATTENTION_FUNCTIONS" in src or "attention_interface" in src


def _model_module(model: nn.Module) -> Any:
    return sys.modules.get(type(model).__module__)


def _objective(model: nn.Module) -> Objective | None:
    from transformers.models.auto import modeling_auto as auto

    name = type(model).__name__
    causal_names = set(auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    masked_names = set(auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES.values())
    # the nearest registered class in the MRO: a user's subclass has the head of its parent
    known = next((c.__name__ for c in type(model).__mro__ if c.__name__ in causal_names | masked_names), name)
    causal = known in causal_names
    masked = known in masked_names
    if causal and masked:  # one class registered for both heads: its config decides
        causal = bool(getattr(model.config, "is_decoder", False) or getattr(model.config, "causal", False))
        masked = not causal
    if causal:
        return "causal"
    if masked:
        return "masked"
    if name.endswith("ForMaskedLM"):
        return "masked"
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal"
    from transformers import PreTrainedModel

    if getattr(model, "base_model", model) is model and isinstance(model, PreTrainedModel):
        return None  # a bare backbone: hidden states per token, no loss
    raise UnsupportedModelError(
        f"{name}: its head is neither a causal nor a masked LM head; heads that pool or classify over the "
        "sequence are not supported under Ulysses SP. Apply Ulysses to the backbone (model.base_model) and "
        "compute the objective with lightning_ulysses' SP objective functions."
    )


def _component_configs(config: Any) -> list[str]:
    """The sub-configs of ``config`` that describe models of their own (a vision tower, a text model).

    Some single models group their settings in sub-configs (DBRX's ``attn_config`` / ``ffn_config``,
    MPT's ``attn_config``): those have no ``model_type`` of their own and are not components.
    """
    from transformers import AutoConfig

    return [key for key, cls in (getattr(config, "sub_configs", None) or {}).items()
            if cls is AutoConfig or getattr(cls, "model_type", "")]


def _check_model_kind(model: nn.Module) -> None:
    from transformers import PreTrainedModel

    name = type(model).__name__
    if not isinstance(model, PreTrainedModel):
        raise UnsupportedModelError(f"apply_ulysses expects a transformers PreTrainedModel, got {name}.")
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"{name} is an encoder-decoder model: its cross-attention reads a second sequence that Ulysses does "
            "not shard. Only decoder-only and encoder-only models are supported."
        )
    if _component_configs(config):
        return  # a composite: its language model is checked (multimodal.composite_parts)
    if not getattr(config, "num_attention_heads", None):
        raise UnsupportedModelError(
            f"{name} has no attention heads (config.num_attention_heads); its token mixing is not attention, so "
            "Ulysses cannot shard it."
        )


def _per_head_parameters(name: str, module: nn.Module, num_heads: int, num_kv: int) -> dict[str, int]:
    """The module's own parameters indexed by query head, with the indexing dimension."""
    found: dict[str, int] = {}
    for pname, p in module.named_parameters(recurse=False):
        dims = [i for i, n in enumerate(p.shape) if n == num_heads]
        if len(dims) == 1 and p.numel() == num_heads:
            found[pname] = dims[0]
        elif len(dims) == 1 and all(n == 1 for i, n in enumerate(p.shape) if i != dims[0]):
            found[pname] = dims[0]
        elif dims or (num_kv != num_heads and num_kv in p.shape and p.dim() > 1 and p.numel() == num_kv):
            raise UnsupportedModelError(
                f"{name}.{pname} (shape {tuple(p.shape)}) is a per-head parameter whose head dimension is "
                "ambiguous; Ulysses cannot slice it to a rank's heads."
            )
    return found


def _token_mixer_reason(module: nn.Module) -> str | None:
    """Why ``module`` mixes tokens outside ``AttentionInterface``, or ``None`` if it does not."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        kernel = module.kernel_size[0]
        if kernel > 1:
            return f"a convolution over the sequence (kernel {kernel})"
        return None
    for pname in _SSM_PARAMETERS:
        if pname in module._parameters:
            return f"a recurrent / state-space layer (parameter {pname})"
    src = _forward_source(module)
    if not src:
        return None
    for op, what in _SEQUENCE_OPS.items():
        if op in src:
            return what
    if _SEQUENCE_SHIFT.search(src):
        return "neighbouring tokens (a slice shifted along the sequence)"
    code = re.sub(r"#[^\n]*", "", src)  # a comment's "comb[j, k]" names no key
    if _INLINE_PRODUCT.search(code) and _QUERY_KEY.search(code):
        return "attention or linear attention computed inline (not through transformers' AttentionInterface)"
    return None


_DEFAULT_POSITIONS = re.compile(r"^(?P<indent>[ \t]*)if position_ids is None:[^\n]*\n", re.M)


def _default_positions_block(src: str) -> str | None:
    """The body of the first ``if position_ids is None:`` in ``src`` (what the module does when it is
    not given positions), ``None`` if it has no such block."""
    m = _DEFAULT_POSITIONS.search(src)
    if m is None:
        return None
    body = []
    for line in src[m.end():].splitlines():
        if line.strip() and len(line) - len(line.lstrip()) <= len(m.group("indent")):
            break
        body.append(line)
    return "\n".join(body)


def _positions(model: nn.Module) -> tuple[Positions, int | None]:
    """How the model derives the positions it is not given.

    The first module, parents before children (the order their forwards run in), whose forward
    fills in missing ``position_ids`` decides: submodules below it receive positions and never use
    their own fallback (BioGPT's base model fills in ``arange`` although its position embedding
    could derive positions from the mask). Without any such block, any module deriving positions
    from ``input_ids`` or from the mask decides.
    """
    for sub in model.modules():
        block = _default_positions_block(_forward_source(sub))
        if block is None:
            continue
        if "create_position_ids_from_input_ids" in block:
            return "from_input_ids", getattr(sub, "padding_idx", None)
        if _derives_positions_from_mask(block):
            return "from_mask", None
        return "arange", None
    for sub in model.modules():
        if "create_position_ids_from_input_ids" in _forward_source(sub):
            return "from_input_ids", getattr(sub, "padding_idx", None)
    for sub in model.modules():
        if _derives_positions_from_mask(_forward_source(sub)):
            return "from_mask", None
    return "arange", None


def _derives_positions_from_mask(src: str) -> bool:
    return "cumsum" in src and "attention_mask" in src and "position" in src


_MASK_CALL = re.compile(r"(?<!def )create_(causal|sliding_window_causal|chunked_causal|bidirectional"
                        r"|bidirectional_sliding_window)_mask\(")
_PASSES_POSITIONS = re.compile(r"position_ids\s*=\s*position_ids|[\"']position_ids[\"']\s*:")


def _call_arguments(src: str, start: int) -> str:
    """The text inside the bracket (a call's parenthesis, a dict's brace) that ends at ``start``."""
    depth, i = 1, start
    while depth and i < len(src):
        depth += {"(": 1, "{": 1, "[": 1, ")": -1, "}": -1, "]": -1}.get(src[i], 0)
        i += 1
    return src[start:i - 1]


def _splits_packed_rows(model: nn.Module) -> bool:
    """Whether the non-SP model keeps packed documents apart when called without a mask.

    transformers finds packed documents from ``position_ids`` restarts inside its causal mask
    builders, and only when the model hands them the positions; bidirectional builders never do.
    Read from the mask-building calls of the model's own code, so a model that builds its masks
    some other way is covered without a list of names.
    """
    for src in {_source(type(m)) for m in model.modules()}:
        for call in _MASK_CALL.finditer(src):
            args = _call_arguments(src, call.end())
            if "encoder_" in args:
                continue  # a cross-attention mask over an encoder's states: not the row's own attention
            if call.group(1).startswith("bidirectional"):
                return False
            if not _PASSES_POSITIONS.search(args) and not _kwargs_pass_positions(src, args):
                return False
    return True


def _kwargs_pass_positions(src: str, args: str) -> bool:
    """Whether a ``**mask_kwargs`` in ``args`` holds ``position_ids``: the dict is built in the same
    source (``mask_kwargs = {...}`` / ``dict(...)`` / ``other.copy()``, or
    ``mask_kwargs["position_ids"] = ...``)."""
    names = re.findall(r"\*\*(\w+)", args)
    for name in names:
        copied = re.search(rf"\b{name}\s*=\s*(\w+)\.copy\(\)", src)  # sliding_kwargs = mask_kwargs.copy()
        if copied and copied.group(1) not in names:
            names.append(copied.group(1))
            continue
        if re.search(rf"\b{name}\[\s*[\"']position_ids[\"']\s*\]\s*=", src):
            return True
        built = re.search(rf"\b{name}\s*=\s*(\{{|dict\()", src)
        if built and _PASSES_POSITIONS.search(_call_arguments(src, built.end())):
            return True
    return False


def _check_masks(model: nn.Module, has_mixers: bool) -> None:
    name = type(model).__name__
    sources = {type(m): _source(type(m)) for m in model.modules()}
    for fn, what in _UNSUPPORTED_MASKS.items():
        if fn == "create_recurrent_attention_mask" and has_mixers:
            # Hybrid models build it for their mixers; called without a 2D mask it is None, and
            # the SP mixers take padding and documents from the gathered metadata instead.
            continue
        if any(fn in src for src in sources.values()):
            raise UnsupportedModelError(f"{name} uses {what} ({fn}); Ulysses SP cannot rebuild it for the full sequence.")
    if not any(_MASK_BUILDERS.search(src) for src in sources.values()):
        raise UnsupportedModelError(
            f"{name} builds its attention mask itself instead of through transformers' masking_utils, so Ulysses "
            "cannot rebuild it for the full sequence."
        )


def _implicit_windows(model: nn.Module, attention: list[str]) -> dict[str, int]:
    """Windows that live only in the model's mask: the backend call does not name them.

    Such a module's window is its own ``sliding_window`` attribute, else the config's window for
    its layer type (``layer_types[layer_idx]``), else the config's window for every layer.
    """
    if not any("create_sliding_window_causal_mask" in _source(type(m)) for m in model.modules()):
        return {}
    try:
        default = getattr(model.config, "sliding_window", None)
    except Exception:  # noqa: BLE001 - configs whose window is per layer refuse the global read
        default = None
    layer_types = getattr(model.config, "layer_types", None)
    found: dict[str, int] = {}
    for name in attention:
        module = model.get_submodule(name)
        if "sliding_window" in _forward_source(module):
            continue  # passed to the backend at each call
        window = getattr(module, "sliding_window", None)
        if window is None and layer_types:
            idx = getattr(module, "layer_idx", None)
            if idx is None:
                raise UnsupportedModelError(
                    f"{type(model).__name__}: attention module {name!r} does not pass its sliding window to the "
                    "backend and has no layer_idx, so Ulysses cannot tell whether its layer is windowed."
                )
            window = default if "sliding" in str(layer_types[idx]) else None
        elif window is None:
            window = default
        if window:
            found[name] = int(window)
    return found


def _chunked_layers(model: nn.Module, attention: list[str]) -> dict[str, int]:
    """Attention modules whose mask is chunked local attention (``attention_chunk_size``): those of
    the layers ``config.layer_types`` calls ``"chunked_attention"``, when the model builds that mask."""
    if not any("create_chunked_causal_mask" in _source(type(m)) for m in model.modules()):
        return {}
    size = getattr(model.config, "attention_chunk_size", None)
    layer_types = getattr(model.config, "layer_types", None)
    if not size:
        return {}
    if not layer_types:
        raise UnsupportedModelError(
            f"{type(model).__name__} builds a chunked attention mask but its config has no layer_types saying "
            "which layers use it; Ulysses cannot tell which layers to chunk."
        )
    found: dict[str, int] = {}
    for name in attention:
        idx = getattr(model.get_submodule(name), "layer_idx", None)
        if idx is None:
            raise UnsupportedModelError(
                f"{type(model).__name__}: attention module {name!r} has no layer_idx, so Ulysses cannot tell whether "
                "its layer uses chunked attention."
            )
        if layer_types[idx] == "chunked_attention":
            found[name] = int(size)
    return found


def _aux_loss(model: nn.Module) -> tuple[AuxLossPlan | None, bool]:
    """The plan for the model's auxiliary loss, and whether it has one that no plan reproduces
    (refused now if the config asks for router logits, else at a forward that asks for them)."""
    src = _forward_source(model)
    if "aux_loss" not in src:
        return None, False
    fn = getattr(_model_module(model), "load_balancing_loss_func", None)
    plan = AuxLossPlan.from_model(model, fn) if fn is not None else None
    if plan is None and getattr(model.config, "output_router_logits", False):
        raise UnsupportedModelError(
            f"{type(model).__name__} adds an auxiliary loss that Ulysses cannot make global over the sequence; "
            "set output_router_logits=False."
        )
    return plan, plan is None


def _valid_sp(model: nn.Module, num_heads: int, num_kv: int) -> list[int]:
    """The ``sp`` every attention layout and every SP mixer of the model allow (their intersection)."""
    attention = HeadLayout.valid_sp(num_heads, num_kv)
    mixers = mixers_valid_sp(model)
    return attention if mixers is None else sorted(set(attention) & set(mixers))


_LOCAL_NUMBERING = re.compile(r"arange\(\s*(hidden_states|query_states|key_states|x|q|k)\.(shape\[|size\()")


def _whole_sequence_modules(model: nn.Module, plan: ModelPlan) -> None:
    """Record what the model derives from the whole sequence (README, "Positions"), or refuse it."""
    attention = set(plan.attention)
    for name, module in model.named_modules():
        if module is model or module is getattr(model, "base_model", None):
            continue
        if name in attention:
            src = _forward_source(module)
            if reads_cache_length(src):
                if cache_argument(module) is None:
                    raise UnsupportedModelError(
                        f"{type(model).__name__}: attention module {name!r} ({type(module).__name__}) numbers its "
                        "tokens from a cache length but takes no cache argument (cache / past_key_values) through "
                        "which SP could give each chunk its offset; not supported.")
                plan.offset_modules.append(name)
            elif _LOCAL_NUMBERING.search(src):
                raise UnsupportedModelError(
                    f"{type(model).__name__}: attention module {name!r} ({type(module).__name__}) numbers its tokens "
                    "from the length of the chunk it is given, so under SP every chunk would restart at 0; not "
                    "supported."
                )
            if any(isinstance(getattr(module, a, None), float) and getattr(module, a) > 0
                   for a in ("attention_dropout", "dropout")):
                plan.dropout.append(name)
        elif is_position_module(module):
            plan.position_modules.append(name)
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            plan.dropout.append(name)
    plan.position_modules = [n for n in plan.position_modules
                             if not any(n.startswith(o + ".") for o in plan.position_modules if o != n)]


def analyse_model(model: nn.Module, sp: int) -> ModelPlan:
    """Decide, before any forward, how ``model`` runs exactly under SP of degree ``sp``.

    Raises:
        UnsupportedModelError: the model cannot be exact under Ulysses; the message names the module
            and the reason.
        ValueError: a head/group layout that ``sp`` cannot split (naming the valid ``sp``).
    """
    _check_model_kind(model)
    components = _component_configs(model.config)
    if components:
        return _analyse_composite(model, composite_parts(model, components), sp)
    name = type(model).__name__
    config = model.config
    base = getattr(model, "base_model", model)
    num_heads = config.num_attention_heads
    num_kv = getattr(config, "num_key_value_heads", None) or num_heads

    plan = ModelPlan(objective=_objective(model), loss_in_forward="self.loss_function(" in _forward_source(model))
    skip: set[int] = set()
    for mod_name, module in model.named_modules():
        if id(module) in skip or module is model:
            continue
        impl = sp_mixer_for(module)
        if impl is not None:
            try:
                impl.check(sp)
            except ValueError as e:
                raise ValueError(f"{e} Valid sp for the whole model: {_valid_sp(model, num_heads, num_kv)}.") from e
            plan.mixers.append((mod_name, module, impl))
            skip.update(id(m) for m in module.modules())
            continue
        if dispatches_attention(module):
            plan.attention.append(mod_name)
            if _MASK_REBOUND.search(_forward_source(module)) or _passes_own_mask(module):
                raise UnsupportedModelError(
                    f"{name}: attention module {mod_name!r} ({type(module).__name__}) computes its own attention "
                    "mask from the local tokens, which Ulysses cannot rebuild for the full sequence."
                )
            heads = getattr(module, "num_heads", None) or getattr(module, "num_attention_heads", None) or num_heads
            per_head = _per_head_parameters(mod_name, module, heads, num_kv)
            if per_head:
                plan.per_head[mod_name] = per_head
            skip.update(id(m) for m in module.modules())
            continue
        reason = refusal_reason(module) or _token_mixer_reason(module)
        if reason == "a cumulative sum over tokens" and _derives_positions_from_mask(_forward_source(module)):
            continue  # positions derived from the padding mask: reproduced by the positions rule
        if reason is not None:
            raise UnsupportedModelError(
                f"{name}: module {mod_name!r} ({type(module).__name__}) mixes tokens through {reason}, which Ulysses "
                "cannot run on the full sequence; this model is not supported under SP."
            )
    if not plan.attention and not plan.mixers:
        raise UnsupportedModelError(
            f"{name} does not dispatch its attention through transformers' AttentionInterface, so Ulysses cannot "
            "shard it; this model is not supported."
        )
    # transformers' own models are checked module by module above and, for the installed version,
    # by the support matrix; code from elsewhere (trust_remote_code) must also declare the flag.
    if not getattr(type(model), "_supports_attention_backend", False) and not plan.mixers \
            and not type(model).__module__.startswith("transformers.models."):
        raise UnsupportedModelError(
            f"{name} does not declare support for transformers' attention backends (_supports_attention_backend), "
            "so not all of its attention may go through the AttentionInterface Ulysses replaces; not supported "
            "for models outside transformers."
        )
    if "position_ids" not in inspect.signature(base.forward).parameters:
        raise UnsupportedModelError(
            f"{type(base).__name__}.forward takes no position_ids, so Ulysses cannot give each chunk its global "
            "positions; not supported."
        )
    _check_masks(model, has_mixers=bool(plan.mixers))
    # transformers' mixers (Mamba, gated delta-net) carry their state across a document start
    # without SP, where the SP mixers restart it: packed rows are split only on request.
    plan.splits_packed_rows = _splits_packed_rows(model) and not plan.mixers
    _whole_sequence_modules(model, plan)
    plan.windows = _implicit_windows(model, plan.attention)
    plan.chunks = _chunked_layers(model, plan.attention)
    plan.positions, plan.padding_idx = _positions(model)
    plan.aux_loss, plan.aux_refused = _aux_loss(model)
    return plan


def _analyse_composite(model: nn.Module, parts: CompositeParts, sp: int) -> ModelPlan:
    """The plan of a vision-language model: its language model's, by names inside ``model``.

    Only the language model runs under Ulysses; the vision tower and projector run replicated on
    the whole images and everything the outer model does before calling the language model runs on
    the whole row (:mod:`.multimodal`), so none of it is sharded and none of it is analysed as a
    token mixer (a patch embedding is a convolution over pixels, not over the sequence).
    """
    plan = analyse_model(parts.module, sp)
    prefix = parts.language_model + "."
    plan.attention = [prefix + n for n in plan.attention]
    plan.per_head = {prefix + n: d for n, d in plan.per_head.items()}
    plan.mixers = [(prefix + n, m, impl) for n, m, impl in plan.mixers]
    plan.windows = {prefix + n: w for n, w in plan.windows.items()}
    plan.chunks = {prefix + n: c for n, c in plan.chunks.items()}
    plan.position_modules = [prefix + n for n in plan.position_modules]
    plan.offset_modules = [prefix + n for n in plan.offset_modules]
    plan.dropout = [prefix + n for n in plan.dropout]
    plan.objective = composite_objective(model)
    plan.loss_in_forward = "self.loss_function(" in _forward_source(model)
    # An auxiliary loss of the outer model (an MoE language model's router loss added at the top)
    # has no global reproduction here yet: a forward asking for router logits is refused.
    plan.aux_refused = plan.aux_refused or plan.aux_loss is not None or "aux_loss" in _forward_source(model)
    plan.aux_loss = None
    plan.composite = parts
    return plan

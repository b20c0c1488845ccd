"""Refusal reasons of the support matrix, sorted into classes, each checked against the model.

A refusal is only useful when its reason is true: "a composite model" for a model that is one
model, or "does not dispatch its attention" for a model that does, sends the user the wrong way.
:func:`reason_class` names the class of a refusal message; :func:`claim_holds` checks the class's
claim on the refused model itself (its config and modules), independently of the analysis that
wrote the message.
"""

from __future__ import annotations

import inspect
import re

from torch import nn

# (class, pattern of the message); the first match wins
CLASSES: list[tuple[str, str]] = [
    ("composite", r"is a composite model"),
    ("encoder-decoder", r"is an encoder-decoder model"),
    ("no attention heads", r"has no attention heads"),
    ("no position_ids", r"\.forward takes no position_ids"),
    ("auxiliary loss", r"adds an auxiliary loss"),
    ("own attention mask", r"computes its own attention mask|builds its attention mask itself"
                           r"|uses a recurrent attention mask"),
    ("convolution", r"mixes tokens through a convolution over the sequence"),
    ("neighbouring tokens", r"mixes tokens through neighbouring tokens"),
    ("inline attention", r"mixes tokens through attention or linear attention computed inline"),
    ("unsupported mixer", r"mixes tokens through \w+"),
    ("does not dispatch", r"does not dispatch its attention through transformers' AttentionInterface"),
    ("token ids to its language model", r"hands its language model '[^']+' \(\w+\.forward\) the token ids"),
    ("bidirectional switch", r"language model is marked bidirectional"),
    ("not an LM head", r"its head is neither a causal nor a masked LM head"),
]


def reason_class(message: str) -> str:
    """The class of a refusal ``message`` (``"unclassified"`` when no pattern matches)."""
    for name, pattern in CLASSES:
        if re.search(pattern, message):
            return name
    return "unclassified"


def _named(model: nn.Module, message: str) -> nn.Module | None:
    """The module a message names (``module 'a.b.c'`` / ``attention module 'a.b.c'``), by its path in
    ``model`` or, for a path inside a submodule (a composite's language model: ``Lfm3Model: module
    'layers.0.conv.conv'``), in the one submodule whose path ends so."""
    found = re.search(r"module '([^']+)'", message)
    if not found:
        return None
    modules = dict(model.named_modules())
    path = found.group(1)
    if path in modules:
        return modules[path]
    inside = [m for name, m in modules.items() if name.endswith("." + path)]
    return inside[0] if len(inside) == 1 else None


def _interface_calls(model: nn.Module, within: nn.Module | None = None) -> int:
    """Attention functions the model's forward takes from transformers' ``AttentionInterface``
    (only those taken inside ``within``'s forward, when given), counted by running it with the
    registry's lookups wrapped: independent of the source reading the analysis does."""
    from unittest import mock

    import torch
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    state = {"calls": 0, "inside": within is None}
    registry = type(ALL_ATTENTION_FUNCTIONS)

    def counted(fn):
        def call(*args, **kwargs):
            state["calls"] += state["inside"]
            return fn(*args, **kwargs)
        return call

    get_interface, getitem = registry.get_interface, registry.__getitem__
    hooks = []
    if within is not None:
        hooks.append(within.register_forward_pre_hook(lambda *a: state.update(inside=True)))
        hooks.append(within.register_forward_hook(lambda *a: state.update(inside=False)))
    try:
        with mock.patch.object(registry, "get_interface", lambda self, *a: counted(get_interface(self, *a))), \
                mock.patch.object(registry, "__getitem__", lambda self, k: counted(getitem(self, k))), torch.no_grad():
            kwargs = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
            model(input_ids=torch.randint(4, 64, (1, 8)), **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return state["calls"]


def claim_holds(cls: str, model: nn.Module, message: str) -> bool:
    """Whether refusal class ``cls`` is true of ``model`` (a tiny build of the refused class)."""
    from lightning_ulysses.models.analysis import _component_configs

    config = model.config
    if cls == "composite":
        return bool(_component_configs(config))
    if cls == "encoder-decoder":
        return bool(getattr(config, "is_encoder_decoder", False))
    if cls == "no attention heads":
        return not getattr(config, "num_attention_heads", None)
    if cls == "no position_ids":
        base = getattr(model, model.base_model_prefix, model)
        return "position_ids" not in inspect.signature(base.forward).parameters
    if cls == "auxiliary loss":
        return hasattr(config, "output_router_logits")
    if cls in ("own attention mask", "neighbouring tokens", "unsupported mixer"):
        named = _named(model, message)
        return named is not None or cls == "own attention mask"  # a model-level mask names no module
    if cls == "convolution":
        named = _named(model, message)
        return isinstance(named, (nn.Conv1d,)) and named.kernel_size[0] > 1
    if cls == "inline attention":
        named = _named(model, message)
        return named is not None and _interface_calls(model, within=named) == 0
    if cls == "does not dispatch":
        return _interface_calls(model) == 0
    if cls == "token ids to its language model":
        return _language_model_gets_ids(model, re.search(r"language model '([^']+)'", message).group(1))
    if cls == "bidirectional switch":
        return any(getattr(m, "is_causal", True) is False for m in model.modules())
    if cls == "not an LM head":
        from transformers.models.auto import modeling_auto as auto

        heads = {*auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values(), *auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES.values()}
        return not any(c.__name__ in heads for c in type(model).__mro__)
    return False


def _language_model_gets_ids(model: nn.Module, name: str) -> bool:
    """Whether the submodule ``name`` is called with ``input_ids`` (not embeddings) when the model
    runs on a text-only row: observed with a hook, not read from the source."""
    import torch

    seen: list[bool] = []

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append(kwargs.get("input_ids") is not None or bool(args and isinstance(args[0], torch.Tensor)
                                                                and not args[0].is_floating_point()))

    hook = model.get_submodule(name).register_forward_pre_hook(record, with_kwargs=True)
    try:
        kwargs = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
        with torch.no_grad():
            model(input_ids=torch.randint(4, 64, (1, 8)), **kwargs)
    except Exception:  # noqa: BLE001 - a model that cannot run text-only: judged by what was seen
        pass
    finally:
        hook.remove()
    return any(seen)

"""Reversible, ordered wrappers around one model instance's ``forward``.

Several features wrap a model's forward (Ulysses prepares the sequence metadata; the tiled loss
computes the loss from hidden states). Stacking instance attributes would make removal order
matter — removing the inner one first would drop the outer one too. Instead each model gets one
chain, installed as its ``forward`` instance attribute while any wrapper is present; wrappers run
outermost-first by ``priority`` whatever order they were added or removed in, and removing the
last one restores the model's own ``forward`` exactly.
"""

from __future__ import annotations

import inspect
import itertools
from typing import Any, Callable

from torch import nn

ForwardWrapper = Callable[..., Any]  # wrapper(next_forward, *args, **kwargs)
_CHAIN_ATTR = "forward"
_MISSING = object()
_tokens = itertools.count()


class _ForwardChain:
    def __init__(self, model: nn.Module) -> None:
        self.saved = model.__dict__.get(_CHAIN_ATTR, _MISSING)
        self.base = model.forward  # the bound method (or a previously installed callable)
        self.wrappers: list[tuple[int, int, ForwardWrapper]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(0, args, kwargs)

    def _call(self, i: int, args: tuple, kwargs: dict) -> Any:
        if i == len(self.wrappers):
            return self.base(*args, **kwargs)
        nxt = lambda *a, **k: self._call(i + 1, a, k)  # noqa: E731
        return self.wrappers[i][2](nxt, *args, **kwargs)


def base_forward(model: nn.Module) -> Callable[..., Any]:
    """The model's forward underneath any wrappers (for signature inspection)."""
    chain = model.__dict__.get(_CHAIN_ATTR)
    return chain.base if isinstance(chain, _ForwardChain) else model.forward


def add_forward_wrapper(model: nn.Module, wrapper: ForwardWrapper, priority: int) -> int:
    """Wrap ``model.forward``; higher ``priority`` runs further outside. Returns a removal token."""
    chain = model.__dict__.get(_CHAIN_ATTR)
    if not isinstance(chain, _ForwardChain):
        chain = _ForwardChain(model)
        model.forward = chain
    token = next(_tokens)
    chain.wrappers.append((priority, token, wrapper))
    chain.wrappers.sort(key=lambda w: -w[0])
    return token


def remove_forward_wrapper(model: nn.Module, token: int) -> None:
    """Remove one wrapper; the last removal restores the model's ``forward`` exactly."""
    chain = model.__dict__.get(_CHAIN_ATTR)
    if not isinstance(chain, _ForwardChain):
        return
    chain.wrappers = [w for w in chain.wrappers if w[1] != token]
    if not chain.wrappers:
        if chain.saved is _MISSING:
            del model.__dict__[_CHAIN_ATTR]
        else:
            model.__dict__[_CHAIN_ATTR] = chain.saved


def bind_call(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Normalise a call into one keyword dict (positional arguments named, ``**kwargs`` flattened)."""
    call = dict(signature.bind_partial(*args, **kwargs).arguments)
    for p in signature.parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            call.update(call.pop(p.name, {}))
    return call


def isolate_config(model: nn.Module) -> Callable[[], None]:
    """Give ``model`` (and every submodule holding it) a private copy of its config.

    transformers hands one config object to every model built from it, and the attention
    implementation is read from that object at each forward: patching it for one model would patch
    all of them. Returns the function that puts the shared object back.
    """
    import copy

    original = model.config
    memo: dict[int, Any] = {}
    private = copy.deepcopy(original, memo)
    # A composite model's components hold its sub-configs (the language model holds
    # ``config.text_config``): each gets the matching part of the private copy.
    configs = {id(c): c for c in _configs(original)}
    holders = [(m, m.__dict__["config"]) for m in model.modules() if id(m.__dict__.get("config")) in configs]
    for m, held in holders:
        m.__dict__["config"] = memo[id(held)] if held is not original else private

    def undo() -> None:
        for m, held in holders:
            m.__dict__["config"] = held

    return undo


def _configs(config: Any) -> list[Any]:
    """``config`` and every sub-config below it (a composite model's text and vision configs)."""
    found = [config]
    for key in getattr(config, "sub_configs", None) or {}:
        sub = getattr(config, key, None)
        if sub is not None and hasattr(sub, "to_dict"):
            found += _configs(sub)
    return found

"""What a model derives from the whole sequence is derived on the whole sequence (README, "Positions").

Under SP a rank holds ``s/sp`` tokens, so a module that computes something from the sequence *as a
whole* is wrong when it runs on the chunk, even with global ``position_ids``: RoPE whose scaling
depends on the longest position (``longrope`` picks its long or short factor from
``max(position_ids) + 1``, ``dynamic`` NTK rescales its base from it), or a position-derived query
scale computed from the local length. Two rules, decided from the model's structure (no RoPE type
is named, so a new one is covered without a code change):

* **position modules** — every parameter-free module whose ``forward`` takes ``position_ids`` (the
  rotary embeddings, whatever their type or rank of positions): under SP it runs once on the
  gathered full-sequence positions, which also sets any state it keeps (``inv_freq``) as the non-SP
  model would, and each rank keeps the slice of its output for its own tokens;
* **cache-offset modules** — attention modules that number their tokens as
  ``arange(local length) + cache.get_seq_length()`` (Llama 4's NoPE temperature tuning; the cache
  argument is ``cache`` or, before transformers 5.25, ``past_key_values``):
  under SP, where no cache is used, they are handed a stand-in whose length is the chunk's first
  global index, so they number the chunk's tokens as the non-SP model numbers the whole row.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..parallel.comm import gather_sequence
from .context import ForwardContext
from .patching import add_forward_wrapper, bind_call, remove_forward_wrapper

RunningContext = Callable[[], "ForwardContext | None"]


def _forward_params(module: nn.Module) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return {}


def is_position_module(module: nn.Module) -> bool:
    """A parameter-free module fed ``position_ids`` (a rotary embedding of any type)."""
    return "position_ids" in _forward_params(module) and next(module.parameters(), None) is None


# What transformers calls an attention module's KV-cache argument: ``cache`` from 5.25 on (with
# ``past_key_values`` a deprecated alias), ``past_key_values`` before.
CACHE_ARGUMENTS = ("cache", "past_key_values")


def cache_argument(module: nn.Module) -> str | None:
    """The name under which ``module.forward`` takes its KV cache, or ``None`` if it takes none."""
    params = _forward_params(module)
    return next((name for name in CACHE_ARGUMENTS if name in params), None)


def reads_cache_length(source: str) -> bool:
    """True when a forward numbers its tokens from the cache length (``get_seq_length`` + ``arange``)."""
    return "get_seq_length" in source and "arange(" in source


class ChunkOffset:
    """Stands in for an absent KV cache in an attention module that numbers its tokens from the
    cache length: its length is the global index of this rank's first token. It stores nothing:
    :meth:`update` returns the keys and values it is given."""

    is_compileable = False

    def __init__(self, offset: int) -> None:
        self.offset = offset

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self.offset

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        return key_states, value_states


def gathered(ctx: ForwardContext, local: Tensor) -> Tensor:
    """``local [..., s/sp]`` gathered along its last axis over ``ctx.group``, once per forward and tensor."""
    cache = ctx.gathered
    hit = cache.get(id(local))
    if hit is not None and hit[0] is local:
        return hit[1]
    full = gather_sequence(local, ctx.group, dim=-1)
    cache[id(local)] = (local, full)  # the key tensor is kept alive, so its id is not reused in this forward
    return full


def _keep_own_tokens(full: Any, local: Any, lo: int, n: int, where: str) -> Any:
    """This rank's part of ``full`` (computed on the whole sequence), laid out as ``local``."""
    if isinstance(full, Tensor):
        if full.shape == local.shape:
            return full  # not per token (a scale of the whole sequence)
        differ = [i for i, (a, b) in enumerate(zip(full.shape, local.shape)) if a != b]
        if full.dim() != local.dim() or len(differ) != 1 or local.shape[differ[0]] != n:
            raise RuntimeError(
                f"{where} computes from position_ids an output of shape {tuple(full.shape)} on the whole sequence "
                f"and {tuple(local.shape)} on a chunk; lightning_ulysses cannot tell which axis holds the tokens, "
                "so it cannot run this module on the whole sequence under SP."
            )
        return full.narrow(differ[0], lo, n)
    if isinstance(full, (tuple, list)):
        return type(full)(_keep_own_tokens(f, l, lo, n, where) for f, l in zip(full, local))
    if isinstance(full, dict):
        return {k: _keep_own_tokens(v, local[k], lo, n, where) for k, v in full.items()}
    return full


def apply_whole_sequence(model: nn.Module, position_modules: list[str], offset_modules: list[str],
                         running: RunningContext) -> Callable[[], None]:
    """Wrap the model's position and cache-offset modules (their ``forward`` instance attributes).

    Args:
        position_modules / offset_modules: submodule names from the model analysis.
        running: returns the context of the SP forward running now, ``None`` outside one (the
            wrappers then call the module unchanged).

    Returns:
        The function that removes every wrapper.
    """
    undo: list[Callable[[], None]] = []
    for name in position_modules:
        module = model.get_submodule(name)
        undo.append(_wrap(module, _position_wrapper(module, name, running)))
    for name in offset_modules:
        module = model.get_submodule(name)
        undo.append(_wrap(module, _offset_wrapper(module, running)))

    def remove() -> None:
        for fn in reversed(undo):
            fn()

    return remove


def _wrap(module: nn.Module, wrapper: Callable[..., Any]) -> Callable[[], None]:
    token = add_forward_wrapper(module, wrapper, priority=100)
    return lambda: remove_forward_wrapper(module, token)


def _position_wrapper(module: nn.Module, name: str, running: RunningContext) -> Callable[..., Any]:
    signature = inspect.signature(module.forward)
    where = f"module {name!r} ({type(module).__name__})"

    def forward(next_forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        ctx = running()
        call = bind_call(signature, args, kwargs)
        positions = call.get("position_ids")
        if ctx is None or not isinstance(positions, Tensor) or ctx.sp_size == 1:
            return next_forward(**call)
        # The chunk's own call fixes the output's layout; the full call then runs last, so state the
        # module keeps (dynamic / longrope inv_freq) is what the non-SP model leaves.
        with torch.no_grad():
            local = next_forward(**call)
        full = next_forward(**{**call, "position_ids": gathered(ctx, positions)})
        n = positions.shape[-1]
        return _keep_own_tokens(full, local, ctx.sp_rank * n, n, where)

    return forward


def _offset_wrapper(module: nn.Module, running: RunningContext) -> Callable[..., Any]:
    signature = inspect.signature(module.forward)
    # the analysis refuses an offset module without a cache argument, so there is one here; passed by
    # the name the signature has, since a deprecated alias beside the real argument may be dropped
    name = cache_argument(module)

    def forward(next_forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        ctx = running()
        call = bind_call(signature, args, kwargs)
        if ctx is not None and call.get(name) is None:
            call[name] = ChunkOffset(ctx.sp_rank * ctx.local_len)
        return next_forward(**call)

    return forward

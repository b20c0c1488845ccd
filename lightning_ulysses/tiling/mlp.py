"""Tiled MLP: every decoder MLP computes tile by tile along the sequence (:func:`tile_mlps`, :class:`TiledMLP`).

A tiled MLP holds one tile's ``[batch, tile, intermediate]`` activations at a time, in forward and in
backward (which recomputes the tile). A gated MLP recomputes only its gate and up projections.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from .compute import _preserved_rng, _tiled_apply, _unique
from .shards import agree_on_shards

__all__ = ["ShardsArg", "TiledMLP", "TiledMLPHandle", "tile_mlps"]

ShardsArg = int | str


def _resolve_shards(shards: ShardsArg, x: torch.Tensor, group: dist.ProcessGroup | None) -> int:
    if shards == "auto":
        # ceil(seq / hidden): a tile's [batch, tile, intermediate] activations then stay around the size of
        # one [batch, hidden, hidden]-ish block, independent of the sequence length.
        local = max(1, math.ceil(x.shape[1] / max(1, x.shape[-1])))
        return agree_on_shards(local, group)
    if isinstance(shards, int) and not isinstance(shards, bool) and shards >= 1:
        return shards
    raise ValueError(f"shards must be a positive int or 'auto', got {shards!r}")


def _gated_linear_tail(forward: Callable[..., torch.Tensor], module: nn.Module, x: torch.Tensor, args: tuple,
                       kwargs: dict) -> tuple[Callable[..., torch.Tensor], nn.Linear] | None:
    """``(head, down_proj)`` when ``forward(x) == down_proj(act_fn(gate_proj(x)) * up_proj(x))`` for this module.

    The structure (Llama, Qwen2, Mistral, Gemma, ... MLPs) is recognised by attribute names and then
    confirmed on one token, bit for bit, with the RNG state restored afterwards: a module that only looks
    like a gated MLP (a different forward, dropout, extra arguments) fails the check and keeps the
    generic full recomputation, so the shortcut can never change what is computed.
    """
    gate, up, down = (getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj"))
    act = getattr(module, "act_fn", None)
    if args or kwargs or not callable(act) or not all(isinstance(m, nn.Linear) for m in (gate, up, down)):
        return None

    def head(x: torch.Tensor) -> torch.Tensor:
        return act(gate(x)) * up(x)

    with _preserved_rng(x.device), torch.no_grad():
        probe = x[:1, :1]
        same = torch.equal(forward(probe), down(head(probe)))
    return (head, down) if same else None


def _tiled_mlp_call(forward: Callable[..., torch.Tensor], module: nn.Module, shards: ShardsArg,
                    group: dist.ProcessGroup | None, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    if x.dim() < 3:
        return forward(x, *args, **kwargs)
    n = _resolve_shards(shards, x, group)

    def tile_fn(x: torch.Tensor, **kw: Any) -> torch.Tensor:
        return forward(x, *args, **kw)

    params = _unique(p for p in module.parameters() if p.requires_grad)
    tail = _gated_linear_tail(forward, module, x, args, kwargs) if torch.is_grad_enabled() else None
    return _tiled_apply(tile_fn, x.shape[1], n, {"x": x}, kwargs, "x", params, 1, None, linear_tail=tail)


class TiledMLP(nn.Module):
    """Wrap a per-token MLP (``LlamaMLP``, ``Qwen2MLP``, ``MistralMLP``, ...) to run tile by tile along the sequence.

    ``forward(x: [batch, seq, hidden]) -> [batch, seq, hidden]``, numerically the wrapped MLP's output;
    only one tile's ``[batch, tile, intermediate]`` activations exist at a time, in forward and backward.
    Backward recomputes each tile; for a gated MLP (``down_proj(act_fn(gate_proj(x)) * up_proj(x))``, checked
    on one token per call) it recomputes only ``gate_proj``/``up_proj`` and takes ``down_proj``'s gradients
    from the recomputed activation, one matmul of three saved per tile.
    The weights are the wrapped module's own (registered as the child ``mlp``, so state-dict keys gain a
    ``mlp.`` prefix; use :func:`tile_mlps` to keep a model's keys unchanged).

    ``shards``: number of tiles, or ``"auto"`` for ``ceil(seq / hidden)`` computed per call and agreed
    (max) over ``group`` (a collective on ``group``, default the world group, when distributed is
    initialised; every rank must call the MLP the same number of times).
    """

    def __init__(self, mlp: nn.Module, shards: ShardsArg, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.mlp = mlp
        self.shards = shards
        self.group = group

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _tiled_mlp_call(self.mlp.forward, self.mlp, self.shards, self.group, x, args, kwargs)


class _TiledForward:
    """Instance-level ``forward`` installed by :func:`tile_mlps`; calls the forward it replaced tile by tile."""

    def __init__(self, module: nn.Module, shards: ShardsArg, group: dist.ProcessGroup | None) -> None:
        self.had_instance_forward = "forward" in module.__dict__
        self.previous = module.__dict__.get("forward")
        # Resolved before patching: the class's bound forward, or a forward someone else installed.
        self.inner: Callable[..., torch.Tensor] = module.forward
        self.module = module
        self.shards = shards
        self.group = group

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _tiled_mlp_call(self.inner, self.module, self.shards, self.group, x, args, kwargs)


class TiledMLPHandle:
    """Returned by :func:`tile_mlps`; ``remove()`` (or leaving a ``with`` block) restores the MLP forwards."""

    def __init__(self, modules: list[tuple[str, nn.Module]]) -> None:
        self.modules = modules

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.modules]

    def remove(self) -> None:
        for _, module in self.modules:
            patch = module.__dict__.get("forward")
            if not isinstance(patch, _TiledForward):
                continue  # already removed, or re-patched by someone else since
            if patch.had_instance_forward:
                module.__dict__["forward"] = patch.previous
            else:
                del module.__dict__["forward"]
        self.modules = []

    def __enter__(self) -> TiledMLPHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __len__(self) -> int:
        return len(self.modules)


def _is_mlp(name: str, module: nn.Module) -> bool:
    cls = type(module).__name__
    if cls.endswith("MLP") or cls.endswith("Mlp"):
        return True
    parts = name.split(".")
    # HF decoder layout: <...>.layers.<i>.mlp
    return len(parts) >= 3 and parts[-1] == "mlp" and parts[-3] == "layers" and parts[-2].isdigit()


def tile_mlps(model: nn.Module, shards: ShardsArg = "auto",
              group: dist.ProcessGroup | None = None) -> TiledMLPHandle:
    """Make every MLP of an HF model compute tile by tile along the sequence; returns a handle to undo it.

    MLPs are modules whose class name ends with ``MLP``/``Mlp`` or that sit at ``<...>.layers.<i>.mlp``;
    only the outermost of nested matches is patched. Each gets an instance attribute ``forward`` (so
    ``state_dict`` keys, parameters and module hooks are untouched) taking ``[batch, seq, hidden]`` and
    returning the same as before; the tiled path requires the MLP to return one tensor. Inputs with fewer
    than 3 dims are passed through untiled.

    ``shards``: tiles per call, or ``"auto"``: ``ceil(seq / hidden)`` (at least 1) from the input's shape at
    call time, agreed (max) over ``group`` (default world group) when distributed is initialised, which is a
    collective on ``group`` at every MLP call.
    """
    if model is None:
        raise ValueError("tile_mlps: model is None")
    if isinstance(model, nn.Module) and _is_mlp("", model):
        candidates = [("", model)]
    else:
        candidates = [(n, m) for n, m in model.named_modules() if n and _is_mlp(n, m)]
    chosen: list[tuple[str, nn.Module]] = []
    for name, module in candidates:
        if any(name.startswith(prefix + ".") for prefix, _ in chosen if prefix):
            continue
        if isinstance(module.__dict__.get("forward"), _TiledForward):
            raise RuntimeError(f"tile_mlps: {name or type(module).__name__} is already tiled")
        chosen.append((name, module))
    if not chosen:
        raise ValueError(f"tile_mlps: no MLP module found in {type(model).__name__}")
    if shards != "auto":
        _resolve_shards(shards, torch.empty(1, 1, 1), None)  # fail at patch time, not at the first forward
    for _, module in chosen:
        module.forward = _TiledForward(module, shards, group)
    return TiledMLPHandle(chosen)


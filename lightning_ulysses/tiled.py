"""Sequence tiling: run a per-token computation tile by tile along the sequence to cap activation memory.

With Ulysses sequence parallelism each rank still holds ``seq / sp`` tokens of every activation, and the
per-token parts of a decoder (the MLP, the LM head + cross-entropy) have the largest intermediates:
``[batch, seq, intermediate]`` for the MLP and ``[batch, seq, vocab]`` logits for the loss. Because
these computations are independent per token, they can be computed on sequence tiles:

* forward runs every tile under ``torch.no_grad()`` and keeps only the (small) concatenated output;
* backward recomputes each tile with grad enabled and backpropagates it on the spot, so at most one
  tile's intermediates are alive at a time.

Parameter gradients are the delicate part. Backpropagating every tile into the parameters would fire
each parameter's gradient-accumulation hook once per tile, which breaks DDP ("Expected to mark a
variable ready only once") and makes FSDP reduce-scatter partial gradients. Here the parameters are
explicit inputs of the autograd function: backward sums their per-tile gradients with
``torch.autograd.grad`` (which never touches ``.grad``) and returns the sum, so autograd accumulates
each parameter exactly once per backward, as if the computation were untiled.

Nothing in this module communicates except :func:`agree_on_shards` (and ``shards="auto"`` in
:func:`tile_mlps` / :class:`TiledMLP`, which calls it).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = [
    "SequenceTiledCompute",
    "TiledMLP",
    "TiledMLPHandle",
    "agree_on_shards",
    "sequence_tiled_compute",
    "tile_bounds",
    "tile_mlps",
    "tiled_causal_lm_loss_sum",
]

_REDUCTIONS = (None, "mean", "sum")
_LOW_PRECISION = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------------
# tiling helpers
# --------------------------------------------------------------------------------------------------
def tile_bounds(seqlen: int, shards: int) -> list[tuple[int, int]]:
    """``(start, end)`` of each tile of a sequence of ``seqlen`` tokens split into ``shards`` tiles.

    Sizes follow :func:`torch.tensor_split` (the first ``seqlen % n`` tiles are one token longer), with
    ``n = min(shards, seqlen)`` so no tile is ever empty: a sequence shorter than ``shards`` gives
    ``seqlen`` tiles of one token. An empty sequence gives a single empty tile so ``fn`` still runs once
    and the output keeps its shape.
    """
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    n = max(1, min(shards, seqlen))
    base, extra = divmod(seqlen, n)
    bounds, start = [], 0
    for i in range(n):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def agree_on_shards(shards: int, group: dist.ProcessGroup | None = None) -> int:
    """Return the maximum of ``shards`` over the ranks of ``group`` (default: the world group).

    Collective on ``group``: every rank of the group must call it. A no-op returning ``shards`` when
    ``torch.distributed`` is not available or not initialised.

    Tile counts derived from local shapes (e.g. ``seq / hidden``) can differ across ranks when local
    sequence lengths differ. That is harmless for the math, but a ``fn`` that communicates per call
    (ZeRO-3 / FSDP1 parameter gathers inside ``fn``'s submodules) must be called the same number of
    times on every rank or the collectives deadlock, hence the agreement.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return int(shards)
    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend or backend == "mpi":
        device = torch.device("cpu")
    else:
        # NCCL-like backends only reduce accelerator tensors.
        acc = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
        if acc is None:
            device = torch.device("cpu")
        else:
            device = torch.device(acc.type, torch.accelerator.current_device_index())
    value = torch.tensor([int(shards)], dtype=torch.int64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return int(value.item())


def _module_params(fn: Callable) -> list[torch.Tensor]:
    """Trainable parameters of ``fn`` when it is an ``nn.Module`` or a bound method of one, else ``[]``."""
    owner = fn if isinstance(fn, nn.Module) else getattr(fn, "__self__", None)
    if isinstance(owner, nn.Module):
        return [p for p in owner.parameters() if p.requires_grad]
    return []


def _unique(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    seen: set[int] = set()
    out = []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _find_leaves(roots: Sequence[torch.Tensor], stop_nodes: set[Any]) -> list[torch.Tensor]:
    """Leaf tensors requiring grad that ``roots`` depend on, not looking past ``stop_nodes``."""
    leaves: dict[int, torch.Tensor] = {}
    stack = [r.grad_fn for r in roots if r.grad_fn is not None]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen or node in stop_nodes:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)  # only AccumulateGrad nodes have one
        if isinstance(variable, torch.Tensor):
            leaves[id(variable)] = variable
            continue
        stack.extend(next_node for next_node, _ in node.next_functions)
    return list(leaves.values())


def _accumulate(acc: torch.Tensor | None, grad: torch.Tensor | None) -> torch.Tensor | None:
    if grad is None:
        return acc
    if acc is None:
        # Summing many tile gradients in bf16/fp16 loses the precision one untiled matmul would keep.
        return grad.float() if grad.dtype in _LOW_PRECISION else grad.clone()
    return acc.add_(grad)


@dataclass
class _TiledSpec:
    """Non-tensor configuration of one :class:`SequenceTiledCompute` call."""

    fn: Callable[..., torch.Tensor]
    seqlen: int
    shards: int
    shard_keys: tuple[str, ...]
    grad_key: str
    pass_kwargs: dict[str, Any]  # kwargs_to_pass with the grad-requiring tensors removed
    pass_grad_keys: tuple[str, ...]  # kwargs_to_pass entries given to apply() as tensor inputs
    unshard_dim: int
    reduction: str | None
    # Optional split fn(x) == linear(head(x)) (a gated MLP's down projection): backward then recomputes
    # only head and takes the linear's gradients by hand, saving one of the MLP's three matmuls per tile.
    head: Callable[..., torch.Tensor] | None = None
    tail_weight: int | None = None  # index into the parameter inputs
    tail_bias: int | None = None


# --------------------------------------------------------------------------------------------------
# the autograd function
# --------------------------------------------------------------------------------------------------
class SequenceTiledCompute(torch.autograd.Function):
    """Autograd function behind :func:`sequence_tiled_compute`; use that wrapper rather than ``apply``.

    ``apply(spec, *tensors)`` with ``tensors = (*sharded, *pass_grad_tensors, *params)``:

    * ``sharded``: the values of ``kwargs_to_shard`` in ``spec.shard_keys`` order, ``[batch, seq, ...]``;
    * ``pass_grad_tensors``: top-level tensors of ``kwargs_to_pass`` that require grad (given to every
      tile unchanged; their gradients are summed over tiles);
    * ``params``: the tensors ``fn`` reads without receiving them as arguments (module parameters);
      their gradients are summed over tiles and returned once.

    Runs locally; no process group is involved.
    """

    @staticmethod
    def forward(ctx: Any, spec: _TiledSpec, *tensors: torch.Tensor) -> torch.Tensor:
        n_shard = len(spec.shard_keys)
        n_pass = len(spec.pass_grad_keys)
        sharded = tensors[:n_shard]
        pass_tensors = tensors[n_shard:n_shard + n_pass]
        params = tensors[n_shard + n_pass:]
        bounds = tile_bounds(spec.seqlen, spec.shards)
        pass_kwargs = {**spec.pass_kwargs, **dict(zip(spec.pass_grad_keys, pass_tensors))}

        ref = sharded[spec.shard_keys.index(spec.grad_key)]
        device_type = ref.device.type
        ctx.autocast = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ctx.device_type = device_type
        # Recomputation must replay the same random stream (dropout) as the forward did.
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(ref.device) if device_type == "cuda" else None

        outs = []
        with torch.no_grad():
            for start, end in bounds:
                tile = {k: t[:, start:end] for k, t in zip(spec.shard_keys, sharded)}
                out = spec.fn(**tile, **pass_kwargs)
                if not isinstance(out, torch.Tensor):
                    raise TypeError(f"sequence_tiled_compute: fn must return a tensor, got {type(out).__name__}")
                outs.append(out)
        output = torch.stack(outs) if spec.unshard_dim == 0 else torch.cat(outs, dim=spec.unshard_dim)

        ctx.spec = spec
        ctx.bounds = bounds
        ctx.tile_shapes = [o.shape for o in outs]
        ctx.tile_dtype = outs[0].dtype
        ctx.full_numel = output.numel()
        # Parameters are kept as plain references, not saved tensors: FSDP refills unsharded parameter
        # storage in place between forward and backward, which would trip the saved-tensor version check.
        ctx.params = params
        ctx.save_for_backward(*sharded, *pass_tensors)
        del outs
        if spec.reduction == "mean":
            return output.mean()
        if spec.reduction == "sum":
            return output.sum()
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        spec: _TiledSpec = ctx.spec
        n_shard = len(spec.shard_keys)
        saved = ctx.saved_tensors
        sharded, pass_tensors = saved[:n_shard], saved[n_shard:]
        params = list(ctx.params)
        needs = ctx.needs_input_grad[1:]  # [0] is the spec
        grad_idx = spec.shard_keys.index(spec.grad_key)
        x = sharded[grad_idx]
        need_x = needs[grad_idx]
        need_pass = needs[n_shard:n_shard + len(pass_tensors)]
        need_params = needs[n_shard + len(pass_tensors):]

        # Detached stand-ins cut the graph at the function boundary: gradients for these inputs are
        # returned from backward, never pushed into the outer graph from here.
        pass_leaves = [t.detach().requires_grad_(need) for t, need in zip(pass_tensors, need_pass)]
        pass_kwargs = {**spec.pass_kwargs, **dict(zip(spec.pass_grad_keys, pass_leaves))}
        explicit = [p for p, need in zip(params, need_params) if need]
        # positions in ``explicit`` of the linear tail's weight and bias (tail path only)
        tail_slots = [(j, idx) for idx in (spec.tail_weight, spec.tail_bias) if idx is not None
                      for j, p in enumerate(explicit) if p is params[idx]]
        # A non-leaf tensor given as a parameter must not be looked through when searching for leaves.
        stop_nodes = {p.grad_fn for p in explicit if p.grad_fn is not None}
        known = {id(p) for p in params} | {id(t) for t in pass_leaves}

        x_grad = torch.zeros_like(x) if need_x else None
        pass_grads: list[torch.Tensor | None] = [None] * len(pass_leaves)
        param_grads: list[torch.Tensor | None] = [None] * len(explicit)
        implicit: list[torch.Tensor] | None = None
        implicit_grads: list[torch.Tensor | None] = []

        offset = 0
        with _replayed_rng(ctx, x.device), torch.enable_grad(), torch.autocast(
            ctx.device_type, dtype=ctx.autocast[1], enabled=ctx.autocast[0]
        ):
            for i, (start, end) in enumerate(ctx.bounds):
                tile = {k: t[:, start:end].detach() for k, t in zip(spec.shard_keys, sharded)}
                x_tile = tile[spec.grad_key].requires_grad_(need_x)
                if spec.head is not None:
                    # out = h @ W^T + b: recompute h only; W's and b's gradients come from h and the
                    # upstream gradient, and h receives grad @ W.
                    h = spec.head(**tile, **pass_kwargs)
                    weight = params[spec.tail_weight].detach()
                    tile_grad, offset = _tile_grad(ctx, grad_output, i, offset, (*h.shape[:-1], weight.shape[0]))
                    flat_grad = tile_grad.reshape(-1, tile_grad.shape[-1])
                    tail_grads = {spec.tail_weight: flat_grad.t() @ h.detach().reshape(-1, h.shape[-1]).to(flat_grad.dtype)}
                    if spec.tail_bias is not None:
                        tail_grads[spec.tail_bias] = flat_grad.sum(0)
                    out, tile_grad = h, torch.matmul(tile_grad, weight.to(tile_grad.dtype)).to(h.dtype)
                    for j, idx in tail_slots:
                        param_grads[j] = _accumulate(param_grads[j], tail_grads[idx])
                else:
                    out = spec.fn(**tile, **pass_kwargs)
                    tile_grad, offset = _tile_grad(ctx, grad_output, i, offset, out.shape)

                if implicit is None:
                    # Leaves fn reads without declaring them (compute_params=None on a plain function):
                    # their summed gradient is delivered once after the loop.
                    implicit = [t for t in _find_leaves([out], stop_nodes) if id(t) not in known and t is not x_tile]
                    implicit_grads = [None] * len(implicit)

                inputs = ([x_tile] if need_x else []) + [t for t in pass_leaves if t.requires_grad]
                inputs += explicit + implicit
                if not inputs or not out.requires_grad:
                    continue
                grads = list(torch.autograd.grad(out, inputs, tile_grad, allow_unused=True))
                del out, tile_grad
                if need_x:
                    g = grads.pop(0)
                    if g is not None:
                        x_grad[:, start:end].copy_(g)
                for j, t in enumerate(pass_leaves):
                    if t.requires_grad:
                        pass_grads[j] = _accumulate(pass_grads[j], grads.pop(0))
                for j in range(len(explicit)):
                    param_grads[j] = _accumulate(param_grads[j], grads.pop(0))
                for j in range(len(implicit)):
                    implicit_grads[j] = _accumulate(implicit_grads[j], grads.pop(0))

        if implicit:
            pairs = [(t, g.to(t.dtype)) for t, g in zip(implicit, implicit_grads) if g is not None]
            if pairs:
                # One accumulation per leaf, so its hooks fire once, as for declared parameters.
                torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])

        explicit_iter = iter(param_grads)
        param_out: list[torch.Tensor | None] = []
        for p, need in zip(params, need_params):
            g = next(explicit_iter) if need else None
            param_out.append(None if g is None else g.to(p.dtype))
        shard_out: list[torch.Tensor | None] = [None] * n_shard
        shard_out[grad_idx] = x_grad
        pass_out = [None if g is None else g.to(t.dtype) for g, t in zip(pass_grads, pass_tensors)]
        return (None, *shard_out, *pass_out, *param_out)


@contextlib.contextmanager
def _preserved_rng(device: torch.device) -> Iterator[None]:
    """Run the block and then put the CPU (and ``device``'s CUDA) random state back as it was."""
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)


@contextlib.contextmanager
def _replayed_rng(ctx: Any, device: torch.device) -> Iterator[None]:
    """Run the block with the RNG state the forward started from, restoring the current state afterwards."""
    with _preserved_rng(device):
        torch.set_rng_state(ctx.cpu_rng)
        if ctx.cuda_rng is not None:
            torch.cuda.set_rng_state(ctx.cuda_rng, device)
        yield


def _tile_grad(ctx: Any, grad_output: torch.Tensor, i: int, offset: int,
               recomputed: Sequence[int]) -> tuple[torch.Tensor, int]:
    """Upstream gradient for tile ``i`` (recomputed output shape ``recomputed``); returns it and the next offset."""
    spec: _TiledSpec = ctx.spec
    shape = ctx.tile_shapes[i]
    if tuple(recomputed) != tuple(shape):
        raise RuntimeError(f"sequence_tiled_compute: recomputed tile {i} has shape {tuple(recomputed)}, "
                           f"forward gave {tuple(shape)}; fn must be deterministic in shape")
    if spec.reduction == "sum":
        return grad_output.to(ctx.tile_dtype).expand(shape), offset
    if spec.reduction == "mean":
        return (grad_output / ctx.full_numel).to(ctx.tile_dtype).expand(shape), offset
    if spec.unshard_dim == 0:
        return grad_output[i], offset
    size = shape[spec.unshard_dim]
    return grad_output.narrow(spec.unshard_dim, offset, size), offset + size


def sequence_tiled_compute(
    fn: Callable[..., torch.Tensor],
    seqlen: int,
    shards: int,
    kwargs_to_shard: dict[str, torch.Tensor],
    kwargs_to_pass: dict[str, Any],
    grad_requiring_tensor_key: str,
    compute_params: Sequence[torch.Tensor] | None = None,
    output_unshard_dimension: int = 1,
    output_reduction: str | None = "mean",
) -> torch.Tensor:
    """Compute ``fn`` tile by tile along the sequence, recomputing each tile in backward.

    Runs locally on the calling rank; no process group is involved (agree ``shards`` across ranks with
    :func:`agree_on_shards` first if ``fn`` communicates per call).

    Args:
        fn: called as ``fn(**tile_kwargs, **kwargs_to_pass)`` once per tile, under ``torch.no_grad()`` in
            forward and again with grad enabled in backward (with the forward's RNG state and autocast
            settings), so it must be deterministic given those.
        seqlen: sequence length, the size of dim 1 of every ``kwargs_to_shard`` tensor.
        shards: requested number of tiles; tile sizes follow :func:`tile_bounds` (uneven tiles allowed,
            never empty; fewer tiles when ``seqlen < shards``).
        kwargs_to_shard: tensors shaped ``[batch, seq, ...]``, split on dim 1.
        kwargs_to_pass: passed unchanged to every call. Top-level tensors in it that require grad receive
            their gradient summed over tiles; nested ones are treated as constants.
        grad_requiring_tensor_key: the ``kwargs_to_shard`` entry whose gradient is returned; the other
            sharded tensors get no gradient.
        compute_params: tensors ``fn`` uses without receiving them as arguments (typically module
            parameters; non-leaf tensors are allowed too). They become inputs of the autograd function,
            so each gets its gradient exactly once per backward, summed over tiles. ``None``: if ``fn`` is
            an ``nn.Module`` or a bound method of one, its parameters with ``requires_grad``; otherwise
            none are declared, and any *leaf* tensor requiring grad that ``fn`` reads is found in the
            first recomputed tile's graph, its tile gradients summed and accumulated once at the end of
            backward through a nested ``torch.autograd.backward`` (correct and once per backward, but DDP
            and FSDP are only guaranteed with declared parameters, and those leaves' ``.grad`` is written
            even when the outer pass is a ``torch.autograd.grad`` call). Non-leaf tensors ``fn`` closes
            over must be declared here or passed in ``kwargs_to_pass``.
        output_unshard_dimension: dim along which tile outputs are concatenated. ``0`` means ``fn``
            returns one scalar/tensor per tile and the outputs are stacked on a new dim 0, giving
            ``[n_tiles, ...]``.
        output_reduction: ``None`` (return the concatenated output), ``"sum"``, or ``"mean"`` over all
            elements of the concatenated output (the exact mean, not a mean of tile means).

    Returns:
        The concatenated output (e.g. ``[batch, seq, ...]`` for ``output_unshard_dimension=1``) or its
        scalar reduction.
    """
    if output_reduction not in _REDUCTIONS:
        raise ValueError(f"output_reduction must be one of {_REDUCTIONS}, got {output_reduction!r}")
    if grad_requiring_tensor_key not in kwargs_to_shard:
        raise KeyError(f"grad_requiring_tensor_key {grad_requiring_tensor_key!r} is not in kwargs_to_shard")
    if not isinstance(shards, int) or shards < 1:
        raise ValueError(f"shards must be a positive int, got {shards!r}")
    overlap = set(kwargs_to_shard) & set(kwargs_to_pass)
    if overlap:
        raise ValueError(f"keys both sharded and passed: {sorted(overlap)}")
    for key, t in kwargs_to_shard.items():
        if t.dim() < 2 or t.shape[1] != seqlen:
            raise ValueError(f"kwargs_to_shard[{key!r}] must be [batch, seq={seqlen}, ...], got {tuple(t.shape)}")

    params = _module_params(fn) if compute_params is None else list(compute_params)
    params = _unique(p for p in params if isinstance(p, torch.Tensor) and p.requires_grad)
    return _tiled_apply(fn, seqlen, shards, kwargs_to_shard, kwargs_to_pass, grad_requiring_tensor_key, params,
                        output_unshard_dimension, output_reduction)


def _tiled_apply(fn: Callable[..., torch.Tensor], seqlen: int, shards: int, kwargs_to_shard: dict[str, torch.Tensor],
                 kwargs_to_pass: dict[str, Any], grad_requiring_tensor_key: str, params: list[torch.Tensor],
                 output_unshard_dimension: int, output_reduction: str | None,
                 linear_tail: tuple[Callable[..., torch.Tensor], nn.Linear] | None = None) -> torch.Tensor:
    """:func:`sequence_tiled_compute` after validation; ``linear_tail=(head, linear)`` declares that
    ``fn(x) == linear(head(x))`` (checked by the caller), which lets backward skip recomputing ``linear``."""
    pass_grad_keys = tuple(k for k, v in kwargs_to_pass.items() if isinstance(v, torch.Tensor) and v.requires_grad)
    head = tail_weight = tail_bias = None
    if linear_tail is not None:
        index = {id(t): i for i, t in enumerate(params)}
        head, linear = linear_tail
        tail_weight = index.get(id(linear.weight))
        tail_bias = None if linear.bias is None else index.get(id(linear.bias))
        if tail_weight is None or (linear.bias is not None and linear.bias.requires_grad and tail_bias is None):
            head = tail_weight = tail_bias = None  # a frozen or undeclared tail: recompute it with the rest
    spec = _TiledSpec(
        fn=fn,
        seqlen=seqlen,
        shards=shards,
        shard_keys=tuple(kwargs_to_shard),
        grad_key=grad_requiring_tensor_key,
        pass_kwargs={k: v for k, v in kwargs_to_pass.items() if k not in pass_grad_keys},
        pass_grad_keys=pass_grad_keys,
        unshard_dim=output_unshard_dimension,
        reduction=output_reduction,
        head=head,
        tail_weight=tail_weight,
        tail_bias=tail_bias,
    )
    return SequenceTiledCompute.apply(
        spec, *kwargs_to_shard.values(), *(kwargs_to_pass[k] for k in pass_grad_keys), *params
    )


# --------------------------------------------------------------------------------------------------
# tiled MLP
# --------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------
# tiled LM head + cross-entropy
# --------------------------------------------------------------------------------------------------
class _LossSumGradsInForward(torch.autograd.Function):
    """``sum(tile_loss(hidden[:, a:b], labels[:, a:b]) for a, b in bounds)`` with its gradients taken in forward.

    ``apply(tile_loss, bounds, hidden [batch, seq, hidden], labels [batch, seq], *params)``: each tile's
    scalar loss is differentiated as soon as it is computed, w.r.t. its hidden-state slice and ``params``
    (the LM head's trainable tensors), and its logits are freed before the next tile. Backward multiplies
    the stored sums by the upstream gradient, so nothing is recomputed and every parameter gets its
    gradient once per backward (DDP/FSDP hooks fire once). Runs locally; no process group is involved.
    """

    @staticmethod
    def forward(ctx: Any, tile_loss: Callable[..., torch.Tensor], bounds: list[tuple[int, int]],
                hidden: torch.Tensor, labels: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        need_h = ctx.needs_input_grad[2]
        need_p = ctx.needs_input_grad[4:]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_p: list[torch.Tensor | None] = [None] * len(params)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        wanted = [p for p, need in zip(params, need_p) if need]
        with torch.enable_grad():
            for a, b in bounds:
                h = hidden[:, a:b].detach().requires_grad_(need_h)
                loss = tile_loss(h, labels[:, a:b])
                inputs = ([h] if need_h else []) + wanted
                if loss.requires_grad and inputs:
                    grads = list(torch.autograd.grad(loss, inputs, allow_unused=True))
                    if need_h:
                        g = grads.pop(0)
                        if g is not None:
                            grad_h[:, a:b].copy_(g)
                    it = iter(grads)
                    grad_p = [_accumulate(acc, next(it)) if need else acc for acc, need in zip(grad_p, need_p)]
                total += loss.detach().float()
        ctx.has_h = grad_h is not None
        ctx.dtypes = [p.dtype for p in params]
        ctx.has_p = [g is not None for g in grad_p]
        ctx.save_for_backward(*([grad_h] if ctx.has_h else []), *(g for g in grad_p if g is not None))
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        saved = iter(ctx.saved_tensors)
        # A 0-dim float32 factor keeps each stored gradient's dtype and multiplies in float32 internally.
        grad_h = next(saved) * grad_output if ctx.has_h else None
        grad_p: list[torch.Tensor | None] = []
        for has, dtype in zip(ctx.has_p, ctx.dtypes):
            if not has:
                grad_p.append(None)
                continue
            acc = next(saved)  # float32 for low-precision parameters: written straight into their dtype
            grad_p.append(torch.mul(acc, grad_output, out=torch.empty_like(acc, dtype=dtype)))
        return (None, None, grad_h, None, *grad_p)


def tiled_causal_lm_loss_sum(
    hidden_states: torch.Tensor,
    lm_head: nn.Module,
    shift_labels: torch.Tensor,
    shards: int,
    ignore_index: int = -100,
    logits_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token cross-entropy through ``lm_head`` without materialising ``[batch, seq, vocab]`` logits.

    Runs locally on the calling rank; no process group is involved (the caller reduces the sum and the
    count over the sequence-parallel / data-parallel groups as its loss normalisation requires).

    Args:
        hidden_states: ``[batch, seq, hidden]`` final hidden states (after the final norm).
        lm_head: maps ``[batch, tile, hidden]`` to ``[batch, tile, vocab]``; its trainable parameters get
            their gradient once per backward.
        shift_labels: ``[batch, seq]`` labels already aligned with ``hidden_states`` (not shifted again).
        shards: number of sequence tiles (see :func:`tile_bounds`); peak extra memory is about one tile of
            logits (plus its float32 copy and gradient) instead of the full ``[batch, seq, vocab]``.
        ignore_index: label value excluded from the sum and the count.
        logits_fn: optional ``[batch, tile, vocab] -> [batch, tile, vocab]`` applied to each tile's logits
            before the loss (e.g. final-logit softcapping).

    Returns:
        ``(loss_sum, n_valid)``: the float32 scalar sum of cross-entropies over labels ``!= ignore_index``
        (0, not NaN, when there are none), differentiable w.r.t. ``hidden_states`` and the ``lm_head``
        parameters; and the int64 scalar count of such labels, without grad.

    With grad enabled, each tile's gradients are taken right after its loss, in forward (the loss is a
    scalar, so backward only has to scale them by the upstream gradient): no tile is recomputed, at the
    price of holding the ``hidden_states``-sized and ``lm_head``-sized gradients from forward to backward,
    which backward would allocate anyway. With float16 anywhere (tensors or autocast) tiles are
    recomputed in backward instead, so that float16 gradients are formed with the loss scale applied.
    """
    if hidden_states.dim() != 3 or shift_labels.shape != hidden_states.shape[:2]:
        raise ValueError(f"expected hidden_states [batch, seq, hidden] and shift_labels [batch, seq], got "
                         f"{tuple(hidden_states.shape)} and {tuple(shift_labels.shape)}")

    def tile_loss(hidden_states: torch.Tensor, shift_labels: torch.Tensor) -> torch.Tensor:
        logits = lm_head(hidden_states)
        if logits_fn is not None:
            logits = logits_fn(logits)
        # reduction="sum" over an all-ignored tile is exactly 0 (a "mean" would be 0/0).
        return F.cross_entropy(logits.float().flatten(0, 1), shift_labels.flatten(),
                               ignore_index=ignore_index, reduction="sum")

    params = _unique(p for p in lm_head.parameters() if p.requires_grad)
    bounds = tile_bounds(hidden_states.shape[1], shards)
    device_type = hidden_states.device.type
    float16 = (hidden_states.dtype == torch.float16 or any(p.dtype == torch.float16 for p in params)
               or (torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.float16))
    if float16 and torch.is_grad_enabled():
        # float16 gradients need the loss scale inside the backward pass to stay out of the subnormal
        # range; the upstream gradient (which carries it) only exists in backward, so recompute there.
        loss_sum = sequence_tiled_compute(
            tile_loss, seqlen=hidden_states.shape[1], shards=shards,
            kwargs_to_shard={"hidden_states": hidden_states, "shift_labels": shift_labels}, kwargs_to_pass={},
            grad_requiring_tensor_key="hidden_states", compute_params=params, output_unshard_dimension=0,
            output_reduction="sum")
    elif not torch.is_grad_enabled() or not (hidden_states.requires_grad or params):
        with torch.no_grad():
            loss_sum = torch.zeros((), dtype=torch.float32, device=hidden_states.device)
            for a, b in bounds:
                loss_sum += tile_loss(hidden_states[:, a:b], shift_labels[:, a:b])
    else:
        loss_sum = _LossSumGradsInForward.apply(tile_loss, bounds, hidden_states, shift_labels, *params)
    n_valid = (shift_labels != ignore_index).sum()
    return loss_sum, n_valid

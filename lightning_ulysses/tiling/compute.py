"""Generic sequence tiling: an autograd function that runs a per-token computation tile by tile.

The per-token parts of a decoder (the MLP, the LM head + cross-entropy) have the largest
intermediates once attention is sharded: ``[batch, seq, intermediate]`` for the MLP and
``[batch, seq, vocab]`` logits for the loss. Because they are independent per token, they can be
computed on sequence tiles:

* forward runs every tile under ``torch.no_grad()`` and keeps only the (small) concatenated output;
* backward recomputes each tile with grad enabled and backpropagates it on the spot, so at most one
  tile's intermediates are alive at a time.

Parameter gradients are the delicate part. Backpropagating every tile into the parameters would fire
each parameter's gradient-accumulation hook once per tile, which breaks DDP ("Expected to mark a
variable ready only once") and makes FSDP reduce-scatter partial gradients. Here the parameters are
explicit inputs of the autograd function: backward sums their per-tile gradients with
``torch.autograd.grad`` (which never touches ``.grad``) and returns the sum, so autograd accumulates
each parameter exactly once per backward, as if the computation were untiled
(docs/tiling.md explains why every gradient is also scaled by the upstream gradient).

Nothing here communicates; agree on the tile count first (:func:`.shards.agree_on_shards`) when
``fn`` does.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from .shards import tile_bounds

__all__ = ["SequenceTiledCompute", "sequence_tiled_compute"]

_REDUCTIONS = (None, "mean", "sum")
_LOW_PRECISION = (torch.float16, torch.bfloat16)


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
                    h_flat = h.detach().reshape(-1, h.shape[-1]).to(flat_grad.dtype)
                    tail_grads = {spec.tail_weight: flat_grad.t() @ h_flat}
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



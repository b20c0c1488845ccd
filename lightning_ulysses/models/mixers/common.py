"""Pieces every non-attention mixer shares under SP: the channel exchange, head/group layouts,
document segments, padding, and the reversible forward patch.

Layout convention: a per-token projection gives ``[batch, seq/sp, channels]`` with channels
head-major (head ``h`` owns a contiguous block), exactly as attention's ``[b, s/sp, H·d]``. The
exchange is :mod:`lightning_ulysses.parallel.comm`'s own (``heads_from_sequence`` / ``sequence_from_heads``),
used with a head dim of 1 so that tensors with different per-head widths (a head's values, its
state-space ``B``/``C``, its scalar time step) travel in **one** all-to-all. All collectives run on
the SP group of the forward's :class:`~lightning_ulysses.models.context.ForwardContext`.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import MethodType
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from ...parallel.comm import heads_from_sequence, sequence_from_heads
from ..context import CONTEXT_KWARG, ForwardContext

_MISSING = object()
# Profiler range around every mixer layer's SP forward, so benchmarks can tell its exchanges
# (nested ulysses/all_to_all ranges) from the attention's.
MIXER_LABEL = "ulysses/mixer"
_SPANS_KEY = "mixers/document_spans"


# -- which sp values a layout allows -----------------------------------------------------------


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def shared_head_sp(num_heads: int, num_groups: int) -> list[int]:
    """Every ``sp`` that splits ``num_heads`` heads which share ``num_groups`` groups.

    ``sp`` must divide the heads; the groups (key heads of a gated delta-net, ``B``/``C`` groups of a
    Mamba2 scan) are either split too (``num_groups % sp == 0``) or, when ``sp`` is a multiple of
    ``num_groups``, each rank's heads lie inside one group and that group is replicated to the
    ``sp / num_groups`` ranks that need it (the GQA rule of the attention path).
    """
    return [sp for sp in divisors(num_heads) if num_groups % sp == 0 or sp % num_groups == 0]


def check_sp(sp: int, valid: list[int], what: str) -> None:
    """Raise the ``ValueError`` the attention path raises for a layout ``sp`` cannot split."""
    if sp not in valid:
        raise ValueError(f"{what} cannot be split evenly over sp={sp} ranks. Choose sp from {valid}.")


@dataclass(frozen=True)
class GroupSlice:
    """Which heads and groups SP rank ``rank`` of ``sp`` computes.

    Attributes:
        heads: ``(first, count)`` of the heads.
        groups: ``(first, count)`` of the groups those heads read.
        replicate: how many ranks need each group (1 when groups are split, ``sp / num_groups``
            when they are replicated).
    """

    heads: tuple[int, int]
    groups: tuple[int, int]
    replicate: int

    @classmethod
    def of(cls, num_heads: int, num_groups: int, sp: int, rank: int) -> "GroupSlice":
        h = num_heads // sp
        if num_groups % sp == 0:
            g = num_groups // sp
            return cls((rank * h, h), (rank * g, g), 1)
        rep = sp // num_groups
        return cls((rank * h, h), (rank // rep, 1), rep)


def replicate_groups(x: Tensor, num_groups: int, replicate: int) -> Tensor:
    """``[b, s/sp, G·w]`` → ``[b, s/sp, G·replicate·w]``, each group repeated in place, so that the
    exchange's rank ``r`` receives group ``r // replicate``. Autograd sums the copies' gradients."""
    if replicate == 1:
        return x
    b, s, c = x.shape
    return x.view(b, s, num_groups, c // num_groups).repeat_interleave(replicate, dim=2).reshape(b, s, -1)


# -- the exchange --------------------------------------------------------------------------------


def channels_from_sequence(tensors: Sequence[Tensor], group: ProcessGroup) -> list[Tensor]:
    """Sequence-sharded → head-sharded channels, all tensors in one all-to-all on ``group`` (SP).

    Args:
        tensors: each ``[batch, seq/sp, C_i]``, ``C_i`` head-major and divisible by ``sp``.
        group: the SP process group; rank ``r`` of it holds sequence chunk ``r``.

    Returns:
        ``[batch, C_i/sp, seq]`` per input (channels first, the layout of a depthwise ``conv1d``):
        channel block ``[r·C_i/sp, (r+1)·C_i/sp)`` over the full sequence on SP rank ``r``, in the
        input's dtype. Inputs of different float dtypes (autocast leaves some projections in
        float32) travel in the promoted dtype and come back cast to their own, which is lossless.
    """
    common = tensors[0].dtype
    for x in tensors[1:]:
        common = torch.promote_types(common, x.dtype)
    out = heads_from_sequence([x.to(common).transpose(1, 2).unsqueeze(-1) for x in tensors], group)
    return [y.squeeze(-1).to(x.dtype) for x, y in zip(tensors, out)]


def sequence_from_channels(x: Tensor, group: ProcessGroup) -> Tensor:
    """Head-sharded → sequence-sharded, the inverse of :func:`channels_from_sequence`.

    Args:
        x: ``[batch, seq, heads/sp, width]``: this rank's heads over the full sequence.
        group: the SP process group.

    Returns:
        ``[batch, seq/sp, heads·width]``: this rank's tokens, every head, in the non-SP layout.
    """
    y = sequence_from_heads(x, group)
    return y.reshape(y.shape[0], y.shape[1], -1)


# -- padding and documents ---------------------------------------------------------------------


def local_valid(ctx: ForwardContext) -> Tensor | None:
    """``[batch, seq/sp]`` padding mask of this rank's tokens (1 = real), or ``None``."""
    valid = ctx.metadata.valid
    if valid is None:
        return None
    lo = ctx.sp_rank * ctx.local_len
    return valid[:, lo : lo + ctx.local_len]


def zero_padding(x: Tensor, valid: Tensor | None) -> Tensor:
    """``x * valid[..., None]`` for ``x`` ``[batch, seq(/sp), channels]``: what HF's mixers do to
    padding (``apply_mask_to_padding_states``), so padded tokens feed nothing into the state."""
    if valid is None:
        return x
    return (x * valid[:, :, None]).to(x.dtype)


def document_spans(ctx: ForwardContext) -> list[list[tuple[int, int]]] | None:
    """Per batch row, the ``[start, end)`` of each packed document on the full sequence; ``None``
    when every row is one document. Computed once per forward (one host sync), kept in the
    metadata's cache so that every mixer layer reuses it."""
    doc_ids = ctx.metadata.doc_ids
    if doc_ids is None:
        return None
    cache = ctx.metadata._cache
    if _SPANS_KEY not in cache:
        spans = []
        for row in doc_ids.cpu():
            _, counts = torch.unique_consecutive(row, return_counts=True)
            ends = counts.cumsum(0).tolist()
            spans.append(list(zip([0] + ends[:-1], ends)))
        cache[_SPANS_KEY] = spans
    return cache[_SPANS_KEY]


# Documents at least this long run alone on views of the inputs; shorter ones are right-padded to
# a power of two (at least SHORT_BUCKET_MIN) and run as one batch per length, so a row of many short
# documents costs a few kernel calls instead of one per document.
SOLO_MIN_LEN = 256
SHORT_BUCKET_MIN = 16


def _right_pad(x: Tensor, dim: int, length: int) -> Tensor:
    extra = length - x.shape[dim]
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def per_document(fn: Callable[..., Tensor], args: Sequence[Tensor], seq_dims: Sequence[int], out_dim: int,
                 spans: list[list[tuple[int, int]]] | None) -> Tensor:
    """``fn(*args)`` run on each document alone (its state and convolution start from zero), the
    results concatenated back along the sequence.

    This is the exact reference for packed rows — each document run through the model on its own —
    for any causal kernel, fused or not: each batch entry of a call holds one document, and a short
    document right-padded with zeros to share a call with others of its length bucket gets the same
    outputs on its real tokens (a causal kernel never looks right; the padded outputs are dropped).

    Args:
        fn: a causal sequence kernel, batch on dim 0 of every argument and of its output.
        args: full-sequence tensors, batch on dim 0; ``seq_dims[i]`` is the sequence dim of ``args[i]``.
        out_dim: the sequence dim of ``fn``'s output.
        spans: from :func:`document_spans`; ``None`` runs ``fn`` once on everything.
    """
    if spans is None:
        return fn(*args)

    def piece(row: int, lo: int, hi: int, length: int) -> list[Tensor]:
        return [_right_pad(a.narrow(0, row, 1).narrow(d, lo, hi - lo), d, length) for a, d in zip(args, seq_dims)]

    outputs: dict[tuple[int, int], Tensor] = {}
    buckets: dict[int, list[tuple[int, int, int]]] = {}
    for row, row_spans in enumerate(spans):
        for lo, hi in row_spans:
            if hi - lo >= SOLO_MIN_LEN:
                outputs[(row, lo)] = fn(*piece(row, lo, hi, hi - lo))
            else:
                length = max(SHORT_BUCKET_MIN, 1 << (hi - lo - 1).bit_length())
                buckets.setdefault(length, []).append((row, lo, hi))
    for length, members in buckets.items():
        batch = [torch.cat(parts, dim=0) for parts in zip(*(piece(row, lo, hi, length) for row, lo, hi in members))]
        out = fn(*batch)
        for i, (row, lo, hi) in enumerate(members):
            outputs[(row, lo)] = out.narrow(0, i, 1).narrow(out_dim, 0, hi - lo)
    rows = []
    for row, row_spans in enumerate(spans):
        pieces = [outputs[(row, lo)] for lo, _ in row_spans]
        rows.append(torch.cat(pieces, dim=out_dim) if len(pieces) > 1 else pieces[0])
    return torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]


def depthwise_weight(conv: nn.Conv1d, channels: Tensor) -> tuple[Tensor, Tensor | None]:
    """The depthwise ``conv``'s ``[channels, kernel]`` weight (and bias) for the given channel
    indices: the rows this rank's heads convolve, as the HF forward passes ``weight.squeeze(1)``."""
    weight = conv.weight.squeeze(1).index_select(0, channels)
    bias = conv.bias.index_select(0, channels) if conv.bias is not None else None
    return weight, bias


# -- recognising a family and patching its forward ----------------------------------------------


def forward_names(module: nn.Module) -> frozenset[str]:
    """The global and attribute names the module class's ``forward`` reads (its bytecode's
    ``co_names``), decorators unwrapped: a structural fingerprint of what the forward computes with,
    independent of the class name. A variant that reads anything more (a multiplier, another norm)
    has another fingerprint and is not taken for a family it does not belong to."""
    fn = inspect.unwrap(type(module).forward)
    code = getattr(fn, "__code__", None)
    return frozenset(code.co_names) if code is not None else frozenset()


def kernel(module: nn.Module, name: str) -> Callable[..., Any]:
    """The function ``name`` exactly as the module's own forward calls it: a global of the module's
    defining file (transformers' torch fallback, or the fused kernel it dispatches to)."""
    return getattr(sys.modules[type(module).__module__], name)


def context_or_none(kwargs: dict[str, Any], get_context: Callable[[], ForwardContext | None],
                    hidden_states: Tensor) -> ForwardContext | None:
    """The forward's context, or ``None`` when this call is not part of an SP forward (then the
    module's own forward runs: ``handle.bypass()``, ``eval_mode="bypass"``).

    The context the model passed down through ``**kwargs`` comes first (every supported model
    passes its kwargs to the mixer; activation-checkpoint recomputation sees the same object). Else
    the handle's current context, if it describes this call: an SP forward always hands a mixer
    this rank's ``[batch, seq/sp]`` chunk, so a context of other dimensions is one left from an
    earlier forward, and a handle that raises has no forward running.
    """
    ctx = kwargs.pop(CONTEXT_KWARG, None)
    if ctx is not None:
        return ctx
    try:
        ctx = get_context()
    except RuntimeError:  # the handle says no Ulysses forward is running
        return None
    if ctx is not None and tuple(hidden_states.shape[:2]) != (ctx.metadata.batch_size, ctx.local_len):
        return None
    return ctx


def patch_forward(module: nn.Module, sp_forward: Callable[..., Tensor],
                  get_context: Callable[[], ForwardContext | None]) -> Callable[[], None]:
    """Install ``sp_forward(module, ctx, hidden_states, **kwargs)`` as ``module``'s ``forward``
    (instance attribute) for calls inside an SP forward; other calls run the class's forward.

    Returns:
        The undo: restores the instance ``__dict__`` exactly (idempotent).
    """
    saved = module.__dict__.get("forward", _MISSING)
    original = module.forward

    def forward(self: nn.Module, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        ctx = context_or_none(kwargs, get_context, hidden_states)
        if ctx is None:
            return original(hidden_states, *args, **kwargs)
        ctx.attention_calls += 1  # a token mixer sharded by Ulysses: the forward did not bypass SP
        with torch.profiler.record_function(MIXER_LABEL):
            return sp_forward(self, ctx, hidden_states, *args, **kwargs)

    module.forward = MethodType(forward, module)
    done = False

    def undo() -> None:
        nonlocal done
        if done:
            return
        done = True
        if saved is _MISSING:
            module.__dict__.pop("forward", None)
        else:
            module.__dict__["forward"] = saved

    return undo


def no_cache(cache_params: Any, module: nn.Module) -> None:
    """Under SP the model runs without a cache (the handle turns it off); a cache here would hold
    one chunk's state, so refuse it instead of computing garbage."""
    if cache_params is not None:
        raise ValueError(
            f"{type(module).__name__} got a recurrent cache under Ulysses SP; generate inside `handle.bypass()` "
            "or apply with eval_mode='bypass'."
        )

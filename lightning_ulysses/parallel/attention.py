"""Ulysses attention: exchange → the model's own attention backend on the full sequence → exchange.

The function built here is registered in transformers' ``AttentionInterface`` under a name unique
to one :class:`~lightning_ulysses.models.apply.UlyssesHandle`, so each model dispatches to its own SP group.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor, nn

from .comm import (
    PendingExchanges,
    destination_major,
    heads_from_sequence,
    pack_send,
    sequence_from_heads,
    sequence_major,
    unpack_received,
)
from .masks import SUPPORTED_BACKENDS
from .segments import plan_segments

if TYPE_CHECKING:
    from ..models.context import ForwardContext


@dataclass(frozen=True)
class HeadLayout:
    """How heads are split over ``sp`` ranks.

    Attributes:
        num_heads: query heads ``Hq`` of the model.
        num_kv_heads: key/value heads ``Hkv``.
        sp: sequence-parallel degree.
        kv_repeat: how many times each KV head is replicated before the exchange (``sp / Hkv``
            when ``sp > Hkv``, else 1), so that rank ``r`` receives the KV head its query heads use.
    """

    num_heads: int
    num_kv_heads: int
    sp: int

    @staticmethod
    def valid_sp(num_heads: int, num_kv_heads: int) -> list[int]:
        """Every ``sp`` that can shard ``num_heads`` query heads grouped over ``num_kv_heads`` KV heads:
        ``sp`` divides ``Hq``, and ``sp`` and ``Hkv`` divide one another (empty when ``Hkv`` does not
        divide ``Hq``)."""
        if num_heads % num_kv_heads:
            return []
        return [d for d in range(1, num_heads + 1)
                if num_heads % d == 0 and (num_kv_heads % d == 0 or d % num_kv_heads == 0)]

    @classmethod
    def validate(cls, num_heads: int, num_kv_heads: int, sp: int) -> "HeadLayout":
        """Check that ``sp`` can shard these heads, raising a ``ValueError`` that names the fix."""
        if sp < 1:
            raise ValueError(f"sp must be >= 1, got {sp}.")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}.")
        if num_heads % sp:
            choices = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
            raise ValueError(
                f"Ulysses SP shards attention heads: num_attention_heads={num_heads} is not divisible by sp={sp}. "
                f"Choose sp from {choices}, or run the rest of the SP degree as a ring (the strategies' ring=None "
                "chooses; apply_ulysses(ring_group=..., ulysses_group=...))."
            )
        if num_kv_heads % sp and sp % num_kv_heads:
            raise ValueError(
                f"num_key_value_heads={num_kv_heads} and sp={sp}: one must divide the other so that each rank's "
                f"query heads share whole KV heads. Choose sp from {cls.valid_sp(num_heads, num_kv_heads)}, or run "
                "the rest of the SP degree as a ring (the strategies' ring=None chooses)."
            )
        return cls(num_heads, num_kv_heads, sp)

    @property
    def kv_repeat(self) -> int:
        return 1 if self.num_kv_heads % self.sp == 0 else self.sp // self.num_kv_heads

    @property
    def local_heads(self) -> int:
        """Query heads on one rank after the exchange."""
        return self.num_heads // self.sp

    @property
    def local_kv_heads(self) -> int:
        """KV heads on one rank after the exchange (replicas included)."""
        return self.num_kv_heads * self.kv_repeat // self.sp

    @property
    def local_kv_groups(self) -> int:
        """Query heads per KV head on one rank after the exchange."""
        return self.local_heads // self.local_kv_heads

    def overlap_choices(self) -> list[int]:
        """The ``overlap_chunks`` this layout allows (see :meth:`check_overlap`)."""
        # the same rule as ``sp`` over all heads, applied to this rank's heads
        return self.valid_sp(self.local_heads, self.local_kv_heads)

    def check_overlap(self, chunks: int) -> int:
        """Validate ``chunks`` head groups per rank, raising a ``ValueError`` that names the choices.

        Each group must hold an equal number of this rank's query heads, and its query heads must
        share whole KV heads: either the KV heads split evenly over the groups, or each KV head
        serves a whole number of groups.
        """
        check_overlap_chunks(chunks)
        if chunks not in self.overlap_choices():
            raise ValueError(
                f"overlap_chunks={chunks} cannot split this rank's {self.local_heads} query / {self.local_kv_heads} KV "
                f"heads (num_attention_heads={self.num_heads}, num_key_value_heads={self.num_kv_heads}, sp={self.sp}) "
                f"into equal groups that share whole KV heads. Choose overlap_chunks from {self.overlap_choices()}."
            )
        return chunks


def check_overlap_chunks(chunks: int) -> int:
    """``overlap_chunks`` must be a positive integer (whether it suits the heads is
    :meth:`HeadLayout.check_overlap`'s question, answerable once the model is known)."""
    if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1:
        raise ValueError(f"overlap_chunks must be a positive integer, got {chunks!r}.")
    return chunks


class _BackendConfigView:
    """The model config as the backend must see it: naming the backend itself.

    Under the patch the config names this model's Ulysses function; HF's flash path reads
    ``module.config._attn_implementation`` to choose its kernel, so it must see e.g.
    ``"flash_attention_2"`` instead.
    """

    def __init__(self, config: Any, backend: str) -> None:
        self.__dict__["_config"] = config
        self.__dict__["_attn_implementation"] = backend

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_config"], name)


class _LocalHeadsView:
    """The attention module as seen by the backend after the exchange.

    Backends read ``module.num_key_value_groups`` to repeat KV heads; after head sharding with KV
    replication that count is the local one, and ``module.config`` must name the backend. A view
    avoids mutating the user's module at all (so nothing can be left changed after ``remove()``);
    per-head parameters (attention sinks) are this rank's slice; every other attribute is the
    module's own.
    """

    def __init__(self, module: nn.Module, num_key_value_groups: int, backend: str,
                 local: dict[str, Tensor] | None = None) -> None:
        self.__dict__["_module"] = module
        self.__dict__["num_key_value_groups"] = num_key_value_groups
        self.__dict__["config"] = _BackendConfigView(module.config, backend)
        self.__dict__.update(local or {})

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_module"], name)


def model_eager_function(attn_module: nn.Module) -> Callable:
    """The model file's own ``eager_attention_forward`` (some add softcapping or sinks)."""
    fn = getattr(sys.modules.get(type(attn_module).__module__), "eager_attention_forward", None)
    if fn is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward as fn
    return fn


def backend_function(backend: str, attn_module: nn.Module) -> Callable:
    """Resolve ``backend`` through transformers' AttentionInterface (eager from the model file)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if backend == "eager":
        return model_eager_function(attn_module)
    return ALL_ATTENTION_FUNCTIONS[backend]


def check_backend(backend: str | None) -> str:
    """Validate the model's attention implementation name for SP, naming the fix when refused."""
    backend = backend or "eager"
    if backend not in SUPPORTED_BACKENDS:
        raise ValueError(
            f"attn_implementation={backend!r} is not supported under Ulysses SP. Load the model with "
            f"attn_implementation set to one of {SUPPORTED_BACKENDS}."
        )
    return backend


def make_ulysses_attention(
    backend: str, layout: HeadLayout, get_context: Callable[[dict], "ForwardContext"], overlap_chunks: int = 1,
    debug_attend_layer: int | None = None,
    per_head: dict[int, dict[str, int]] | None = None,
    windows: dict[int, int] | None = None,
    chunks: dict[int, int] | None = None,
    ring: bool = False,
) -> Callable[..., tuple[Tensor, None]]:
    """Build the attention function registered for one model.

    The returned function has transformers' attention-interface signature:
    ``fn(module, query, key, value, attention_mask, **kwargs) -> (attn_output, None)`` with
    ``query: [batch, Hq, seq/sp, head_dim]``, ``key``/``value: [batch, Hkv, seq/sp, head_dim]``
    (this rank's chunk) and ``attn_output: [batch, seq/sp, Hq, head_dim]``. Collectives run on the
    SP group of the forward context.

    With ``overlap_chunks > 1`` this rank's heads are processed in that many groups whose
    exchanges run while another group's attention computes, forward and backward
    (:func:`_overlapped_attention`). Attention is independent per head, so the result is the
    same computation in another order.

    ``per_head`` maps an attention module (by ``id``) to its own parameters indexed by query head
    (name → head dimension), e.g. attention sinks: the backend sees them sliced to this rank's heads.
    ``windows`` maps an attention module (by ``id``) to the sliding window the model puts only in
    its mask, not in the backend call; ``chunks`` maps one to its chunked-local-attention size
    (:meth:`~.masks.SequenceMetadata.chunked`). A module whose query / KV head counts differ from the config's (multi-query variants, mixtures
    of attention heads) gets its own layout, validated against ``sp`` at its first call.

    With ``ring=True`` the SP group is split as ``ring × ulysses`` (:meth:`~.mesh.ParallelDims.split`):
    the exchange runs on the Ulysses group only (``layout.sp`` is the Ulysses degree), after which each
    rank holds its ring block of ``seq / ring`` tokens for its heads, and :func:`~.ring.ring_attention`
    passes the key/value blocks around the ring group (:func:`_ring_attention`).

    ``debug_attend_layer`` (debug only, see ``apply_ulysses(debug_skip_attention=True)``): every
    attention module whose ``layer_idx`` differs skips the backend (:func:`_debug_skipped_attention`);
    the exchanges still run.
    """
    layout.check_overlap(overlap_chunks)
    per_head = per_head or {}
    windows = windows or {}
    chunks = chunks or {}
    layouts = {(layout.num_heads, layout.num_kv_heads): layout}

    def ulysses_attention(
        module: nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        **kwargs: Any,
    ) -> tuple[Tensor, None]:
        ctx = get_context(kwargs)
        if attention_mask is not None:
            # HF only hands us a mask it did not build itself (a user 4D mask): it describes the
            # local chunk, and honouring it is impossible after the exchange.
            raise ValueError(
                "a prepared 4D attention_mask cannot be used under Ulysses SP; pass the 2D padding mask "
                "[batch, seq] (and position_ids for packed documents) instead."
            )
        heads = (query.shape[1], key.shape[1])
        if heads not in layouts:
            layouts[heads] = HeadLayout.validate(*heads, layout.sp)
        lay = layouts[heads]
        if overlap_chunks > 1 and (lay is not layout or query.shape[-1] != value.shape[-1] or id(module) in per_head):
            raise ValueError(
                f"overlap_chunks > 1 needs every attention module to have the config's head layout, equal Q/K and V "
                f"head sizes and no per-head parameters; {type(module).__name__} does not. Use overlap_chunks=1."
            )
        ctx.attention_calls += 1
        local = _local_head_parameters(module, per_head.get(id(module)), ctx.ulysses_rank * lay.local_heads,
                                       lay.local_heads, kwargs)
        if lay.kv_repeat > 1:
            key = key.repeat_interleave(lay.kv_repeat, dim=1)
            value = value.repeat_interleave(lay.kv_repeat, dim=1)

        if id(module) in windows and kwargs.get("sliding_window") is None:
            kwargs["sliding_window"] = windows[id(module)]
        sliding_window = kwargs.get("sliding_window")
        causal = bool(kwargs.pop("is_causal", getattr(module, "is_causal", True)))
        meta = ctx.metadata.chunked(chunks[id(module)]) if id(module) in chunks else ctx.metadata
        skip = debug_attend_layer is not None and getattr(module, "layer_idx", debug_attend_layer) != debug_attend_layer
        if ring:
            return _ring_attention(module, query, key, value, lay, meta, sliding_window, causal, kwargs, ctx,
                                   skip), None
        # sdpa/eager: documents, padding and window bands as separate calls, no [s, s] mask
        # (segments.py); every other pattern/backend takes the mask of masks.py.
        plan = plan_segments(meta, backend, sliding_window, causal)
        if plan is not None:
            attend = plan.bind(lambda m, extra: _backend_call(backend, module, m, {**kwargs, **extra}, local), backend)
        else:
            mask, extra = meta.for_backend(backend, sliding_window, causal, query.dtype)
            kwargs.update(extra)
            # Backends that read positions (flash's packed-sequence detection) must see global ones.
            kwargs["position_ids"] = meta.position_ids
            attend = _backend_call(backend, module, mask, kwargs, local)
        if skip:
            attend = _debug_skipped_attention
        if overlap_chunks > 1:
            return _overlapped_attention(attend, query, key, value, layout, overlap_chunks, ctx.ulysses_group), None
        q, k, v = heads_from_sequence([query, key, value], ctx.ulysses_group)
        out = attend(q, k, v, lay.local_kv_groups)
        # out: [batch, seq, Hq/sp, head_dim] -> [batch, seq/sp, Hq, head_dim]
        return sequence_from_heads(out, ctx.ulysses_group), None

    return ulysses_attention


# What the ring kernel does with the backend kwargs HF's attention modules pass: computed with
# (``scaling``, ``softcap``, ``s_aux`` sinks, ``sliding_window``, ``dropout`` which must be 0), or
# irrelevant to the attention maths (positions, caches, output flags, flash's packing metadata,
# which the metadata already describes).
RING_COMPUTED = ("scaling", "softcap", "s_aux", "sliding_window", "dropout")
RING_IRRELEVANT = ("position_ids", "cache_position", "output_attentions", "output_hidden_states",
                   "output_router_logits", "use_cache", "past_key_value", "past_key_values", "num_items_in_batch",
                   "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx", "return_dict",
                   "layer_idx", "token_type_ids")


# Backend arguments by these names would change the attention maths (a bias, another sink or scale).
_RING_MATHS = re.compile(r"bias|alibi|sink|mask|softcap|scal|temperature|logit")


def check_ring_kwargs(module: nn.Module, kwargs: dict[str, Any]) -> None:
    """Refuse what the ring kernel does not compute: attention dropout in training, any other float
    backend argument, and tensors named like a change of the attention maths (the forward's own
    per-token inputs, ``shift_labels`` and the like, pass through every layer's kwargs unused)."""
    if float(kwargs.get("dropout") or 0.0) > 0.0:
        raise ValueError(
            f"{type(module).__name__} applies attention dropout ({kwargs['dropout']}), which ring attention does not "
            "compute. Set the config's attention_dropout to 0 for training, or use a split without a ring (ring=1)."
        )
    unknown = sorted(k for k, v in kwargs.items() if k not in RING_COMPUTED + RING_IRRELEVANT
                     and (isinstance(v, float) or (isinstance(v, Tensor) and _RING_MATHS.search(k))))
    if unknown:
        raise ValueError(
            f"{type(module).__name__} passes {unknown} to its attention backend, which ring attention does not "
            "implement; this model runs only without a ring (ring=1)."
        )


def _ring_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, layout: HeadLayout,
                    metadata: Any, sliding_window: int | None, causal: bool, kwargs: dict[str, Any],
                    ctx: "ForwardContext", skip: bool) -> Tensor:
    """Ulysses × ring: exchange heads on the Ulysses group, ring attention over the ring group,
    exchange back.

    ``query``: ``[batch, Hq, seq/sp, head_dim]`` (``key``/``value`` KV heads already replicated);
    returns ``[batch, seq/sp, Hq, head_dim]``. After the exchange this rank holds ring block
    ``ctx.ring_rank`` — tokens ``[j*seq/ring, (j+1)*seq/ring)``, since SP ranks ``j*ulysses ..
    (j+1)*ulysses - 1`` hold consecutive chunks — for ``Hq/ulysses`` heads.
    """
    from .ring import contiguous_indices, ring_attention, zigzag_indices
    from .zigzag import contiguous_halves, relayout, zigzag_halves

    check_ring_kwargs(module, kwargs)
    q, k, v = heads_from_sequence([query, key, value], ctx.ulysses_group)
    if skip:
        out = _debug_skipped_attention(q, k, v, layout.local_kv_groups)
    else:
        seq, ring = metadata.seq_len, ctx.ring_size
        # the balanced layout pays off for causal attention over the whole row; a window already
        # gives every block the same work (module docstring of parallel/zigzag.py)
        zigzag = ctx.ring_layout == "zigzag" and causal and sliding_window is None and seq % (2 * ring) == 0
        if zigzag:  # Q, K, V in one exchange: [b, s_blk, heads * head_dim] side by side (GQA, MLA sizes)
            parts = [x.transpose(1, 2).flatten(2) for x in (q, k, v)]
            moved = relayout(torch.cat(parts, dim=-1), 1, contiguous_halves(ring), zigzag_halves(ring),
                             ctx.ring_group).split([x.shape[-1] for x in parts], dim=-1)
            q, k, v = (m.unflatten(2, (x.shape[1], x.shape[3])).transpose(1, 2) for m, x in zip(moved, (q, k, v)))
        cut = zigzag_indices if zigzag else contiguous_indices
        index = [cut(seq, ring, j).to(q.device) for j in range(ring)]
        with torch.profiler.record_function("ulysses/attention/ring"):
            out = ring_attention(q, k, v, group=ctx.ring_group, metadata=metadata, token_index=index, causal=causal,
                                 sliding_window=sliding_window, scaling=kwargs.get("scaling"),
                                 softcap=kwargs.get("softcap"), sinks=kwargs.get("s_aux"))
        if zigzag:
            out = relayout(out, 1, zigzag_halves(ring), contiguous_halves(ring), ctx.ring_group)
    return sequence_from_heads(out, ctx.ulysses_group)


def _local_head_parameters(module: nn.Module, dims: dict[str, int] | None, lo: int, n: int,
                           kwargs: dict[str, Any]) -> dict[str, Tensor]:
    """The module's per-head parameters cut to heads ``[lo, lo + n)`` (this rank's after the
    exchange); keyword arguments that pass one of them to the backend (``s_aux=self.sinks``) are
    replaced by the slice too. Slicing is differentiable: gradients reach the full parameter."""
    if not dims:
        return {}
    local = {name: getattr(module, name).narrow(dim, lo, n) for name, dim in dims.items()}
    for key, value in list(kwargs.items()):
        for name in dims:
            if value is getattr(module, name):
                kwargs[key] = local[name]
    return local


def _backend_call(backend: str, module: nn.Module, mask: Any, kwargs: dict[str, Any],
                  local: dict[str, Tensor] | None = None) -> Callable[..., Tensor]:
    """``attend(q, k, v, kv_groups) -> out``: the backend on head-sharded full-sequence tensors
    ``[batch, heads, seq, head_dim]`` → ``[batch, seq, heads, head_dim]``; ``local`` holds the
    module's per-head parameters already cut to these heads."""
    fn = backend_function(backend, module)

    def attend(q: Tensor, k: Tensor, v: Tensor, kv_groups: int) -> Tensor:
        view = _LocalHeadsView(module, kv_groups, backend, local)
        with torch.profiler.record_function(f"ulysses/attention/{backend}"):
            out, _ = fn(view, q, k, v, mask, **kwargs)
        return out

    return attend


class _SkippedAttention(torch.autograd.Function):
    """Debug stand-in for the backend (see :func:`_debug_skipped_attention`)."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, kv_groups: int) -> Tensor:
        out = v.repeat_interleave(kv_groups, dim=1)
        # What flash / memory-efficient kernels keep for backward: q, k, v, the output and the
        # float32 softmax statistics [b, heads, s]; so a skipped layer holds the memory of a real one.
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.kv_groups = kv_groups
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, _, _ = ctx.saved_tensors
        grad_v = grad_out.unflatten(1, (v.shape[1], ctx.kv_groups)).sum(2)
        return torch.zeros_like(q), torch.zeros_like(k), grad_v, None


def _debug_skipped_attention(q: Tensor, k: Tensor, v: Tensor, kv_groups: int) -> Tensor:
    """Debug stand-in for the backend: the values of each query head's KV head, ``[b, s, heads, d_v]``
    from ``q``/``k``/``v`` ``[b, heads, s, d]``.

    Skips the O(s^2) work and its temporaries but keeps what a linear-memory kernel (flash, sdpa's
    memory-efficient path) keeps for backward — q, k, v, the output and the softmax statistics —
    and returns gradients of their shapes (zeros for q and k), so a skipped layer holds a real
    layer's memory and every projection still gets a gradient (DDP finds no unused parameters).
    Never a result to train on.
    """
    return _SkippedAttention.apply(q, k, v, kv_groups).transpose(1, 2)


def _overlapped_attention(
    attend: Callable[..., Tensor],
    query: Tensor,
    key: Tensor,
    value: Tensor,
    layout: HeadLayout,
    chunks: int,
    group: Any,
) -> Tensor:
    """Ulysses attention in ``chunks`` head groups whose exchanges overlap attention compute.

    Args:
        attend: the backend call (:func:`_backend_call`).
        query: ``[batch, Hq, seq/sp, head_dim]``; ``key``/``value``: ``[batch, Hkv*kv_repeat, seq/sp,
            head_dim]`` (KV already replicated), this rank's sequence chunk.
        chunks: head groups per rank, validated by :meth:`HeadLayout.check_overlap`.
        group: the SP process group all exchanges run on.

    Returns:
        ``[batch, seq/sp, Hq, head_dim]``, heads in the non-SP order.

    Forward: every group's Q/K/V exchange starts first; group ``g``'s attention runs as soon as its
    own data has arrived, while the later groups' inputs and the earlier groups' outputs move.
    Backward runs the mirror image: every output-gradient exchange starts at once, and the inverse
    exchange of group ``g``'s Q/K/V gradients moves during group ``g-1``'s attention backward (the
    autograd engine runs the ready node created last first, and the nodes are created in that order).
    When the KV heads do not split evenly over the groups, all of them travel with the first group.
    """
    sp = layout.sp
    b, _, s_local, d = query.shape
    hq, hkv = layout.local_heads, layout.local_kv_heads
    n = hq // chunks  # query heads per group
    kv_split = hkv % chunks == 0
    m = hkv // chunks if kv_split else hkv  # KV heads sent with a group that carries KV
    kv_per_q = layout.local_kv_groups  # query heads per KV head on this rank
    qd, kd, vd = (destination_major(x, sp) for x in (query, key, value))  # [sp, b, s/sp, h, d]
    pending = PendingExchanges(group)

    recvs = []
    for g in range(chunks):
        parts = [qd[:, :, :, g * n : (g + 1) * n]]
        if kv_split or g == 0:
            lo = g * m if kv_split else 0
            parts += [kd[:, :, :, lo : lo + m], vd[:, :, :, lo : lo + m]]
        recvs.append(pending.launch(pack_send(parts), ("qkv", g)))

    sent_back = []
    for g in range(chunks):
        recv = pending.wait(recvs[g], ("qkv", g))
        if kv_split or g == 0:
            q, k_src, v_src = unpack_received(recv, [n, m, m])
        else:
            (q,) = unpack_received(recv, [n])
        if kv_split:
            k, v, groups = k_src, v_src, kv_per_q
        else:  # each KV head serves whole groups (kv_per_q is a multiple of n): one head per group
            head = g * n // kv_per_q
            k, v, groups = k_src[:, head : head + 1], v_src[:, head : head + 1], n
        out = attend(q, k, v, groups)  # [b, s, n, d]
        sent_back.append(pending.launch(sequence_major(out, sp), ("out", g)))

    # [sp (source = head rank), b, s/sp, n, d] per group -> [b, s/sp, sp, chunks, n, d]: one copy,
    # and head index src*hq + g*n + i is the non-SP head order.
    done = [pending.wait(r, ("out", g)).permute(1, 2, 0, 3, 4) for g, r in enumerate(sent_back)]
    return torch.stack(done, dim=3).reshape(b, s_local, sp * hq, d)

"""Exact ring attention: each rank keeps its query block while key/value blocks travel the ring.

This module owns the kernel of ring attention (Ulysses × ring) and nothing around it: the
token layouts of the ring (:func:`contiguous_indices`, :func:`zigzag_indices`), the block plan
(which pairs of query and key runs can interact), the point-to-point rotation of K/V blocks over
the ring process group, and the forward/backward of :func:`ring_attention` as one
``torch.autograd.Function``. Building the ring group and calling this from the attention wrapper is
the caller's job.

The rule of who attends to whom is :meth:`SequenceMetadata.mask_mod` evaluated on **true** token
indices (causal, packed documents, sliding window, padding; a padding query attends to itself
only); it is never redefined here, only used to build the boolean mask of a sub-block that needs
one.

The maths. For one query row and the scores ``s_k`` against all keys ``k`` of the full sequence
(``s_k = softcap·tanh(q·k·scaling / softcap)`` or just ``q·k·scaling``; ``-inf`` where the rule
forbids), with an optional per-head sink logit ``σ`` joining the denominator:

    lse = log(Σ_k exp(s_k) + exp(σ)),    o = Σ_k exp(s_k − lse) · v_k.

Keys arrive block by block. Online softmax keeps, per row, a running maximum ``m``, the running
sum ``l = Σ exp(s_k − m)`` and the unnormalised output ``a = Σ exp(s_k − m) v_k``; a new block with
maximum ``m_b`` merges as ``m' = max(m, m_b)``, ``l' = e^{m−m'} l + Σ_b exp(s_k − m')``,
``a' = e^{m−m'} a + Σ_b exp(s_k − m') v_k`` — the log-sum-exp merge
``lse = logaddexp(lse_a, lse_b)``, ``o = e^{lse_a−lse} o_a + e^{lse_b−lse} o_b`` written without a
division per block. At the end ``lse = logaddexp(m + log l, σ)`` and ``o = a · e^{m−lse}``.

Backward (flash-attention style) recomputes each block's probabilities from the final ``lse``,
``P = exp(S − lse)``, and with ``D = rowsum(dO ∘ O)``: ``dP = dO Vᵀ``, ``dS = P ∘ (dP − D)``
(times ``1 − tanh²`` under a softcap), ``dQ += dS K · scaling``, ``dK += dSᵀ Q · scaling``,
``dV += Pᵀ dO``, and for the sink ``dσ = −Σ_rows exp(σ − lse) · D``. ``dK``/``dV`` accumulators
travel with their K/V block and return to the block's owner after one more hop.

Blocks are not masked wholesale: every block is cut into runs of consecutive true indices, and at
its middle (so two runs per block in both layouts: the zigzag's two blocks, a contiguous block's
halves), and each (query run, key run) pair is classified from
index ranges and per-row document/padding summaries as *empty* (skipped: entirely in the future,
outside the window, no shared document or no real token in any row), *full* (computed without a
mask) or *masked* (computed with just that sub-block's mask). :func:`record_ring_stats` counts them.
"""

from __future__ import annotations

import contextlib
import enum
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from .masks import SequenceMetadata

__all__ = ["RingStats", "contiguous_indices", "record_ring_stats", "ring_attention", "zigzag_indices"]

# Point-to-point tags: K/V blocks and their gradient accumulators may be in flight together between
# the same two ranks (ring of 2), so each tensor of each kind gets its own tag (gloo matches by tag).
_KV_TAG = 0
_GRAD_TAG = 2

# The longest run of a (query run, key run) pair: bounds each pair's score tensor at
# batch · Hq · max_run² and lets the causal diagonal skip its upper triangle at that grain. On CPU
# (one thread, 2048-4096 causal tokens, Hq 8, d 64) 256 was the fastest of 64..1024, about 2.3x
# faster than uncapped runs at 4096: smaller score tiles stay in cache and skip more of the diagonal.
# Accelerators pay a launch per op of every pair, so they get longer runs (not measured yet).
MAX_RUN_CPU = 256
MAX_RUN_ACCELERATOR = 1024


def _max_run(device: torch.device) -> int:
    """The longest run of query or key tokens one pair computes at once on ``device``."""
    return MAX_RUN_CPU if device.type == "cpu" else MAX_RUN_ACCELERATOR


# -- layouts --------------------------------------------------------------------------------------


def _check_layout(seq_len: int, ring: int, rank: int) -> None:
    if ring < 1:
        raise ValueError(f"ring size must be >= 1, got {ring}")
    if not 0 <= rank < ring:
        raise ValueError(f"ring rank {rank} is outside the ring of size {ring}")


def contiguous_indices(seq_len: int, ring: int, rank: int) -> Tensor:
    """True token indices held by ring rank ``rank`` when the sequence is cut into ``ring`` equal
    consecutive blocks: long ``[seq_len // ring]``.

    Raises:
        ValueError: if ``seq_len`` is not a multiple of ``ring``.
    """
    _check_layout(seq_len, ring, rank)
    if seq_len % ring:
        raise ValueError(
            f"sequence length {seq_len} is not a multiple of the ring size {ring}; "
            f"pad the sequence to a multiple of {ring}."
        )
    block = seq_len // ring
    return torch.arange(rank * block, (rank + 1) * block)


def zigzag_indices(seq_len: int, ring: int, rank: int) -> Tensor:
    """True token indices held by ring rank ``rank`` in the causal-balanced zigzag layout: long
    ``[seq_len // ring]``.

    The sequence is cut into ``2 * ring`` equal blocks; rank ``j`` holds block ``j`` then block
    ``2 * ring - 1 - j``, so under causal attention every rank has the same number of block pairs
    to compute.

    Raises:
        ValueError: if ``seq_len`` is not a multiple of ``2 * ring``.
    """
    _check_layout(seq_len, ring, rank)
    if seq_len % (2 * ring):
        raise ValueError(
            f"sequence length {seq_len} is not a multiple of 2 * ring = {2 * ring} (the zigzag layout "
            f"cuts it into 2 * ring blocks); pad the sequence to a multiple of {2 * ring}."
        )
    block = seq_len // (2 * ring)
    late = 2 * ring - 1 - rank
    return torch.cat([torch.arange(rank * block, (rank + 1) * block), torch.arange(late * block, (late + 1) * block)])


# -- counters ---------------------------------------------------------------------------------------


@dataclass
class RingStats:
    """Work done by :func:`ring_attention` on this process, counted at each forward (the backward
    recomputes exactly the same pairs).

    Attributes:
        computed_pairs: (query run, key run) pairs computed, with or without a mask.
        masked_pairs: of those, the pairs that needed a boolean mask.
        skipped_pairs: pairs skipped because no query of the run can attend to any key of the run.
        scores_computed: attention scores computed, ``batch * query_heads * n_q * n_k`` summed.
    """

    computed_pairs: int = 0
    masked_pairs: int = 0
    skipped_pairs: int = 0
    scores_computed: int = 0


_recorders: list[RingStats] = []


@contextlib.contextmanager
def record_ring_stats() -> Iterator[RingStats]:
    """Count the work of every :func:`ring_attention` forward inside the block (this process
    only). Yields a fresh :class:`RingStats`; nothing is recorded once the block exits."""
    stats = RingStats()
    _recorders.append(stats)
    try:
        yield stats
    finally:
        _recorders.remove(stats)


# -- the block plan ---------------------------------------------------------------------------------


class _Kind(enum.Enum):
    FULL = "full"
    MASKED = "masked"


@dataclass(frozen=True)
class _Run:
    """Consecutive true indices ``first .. first + length - 1`` at local positions ``lo .. hi - 1``
    of their owner's block, with per-row summaries of the metadata over the run (``[b]``, CPU)."""

    lo: int
    hi: int
    first: int
    doc_min: Tensor | None
    doc_max: Tensor | None
    valid_any: Tensor | None
    valid_all: Tensor | None

    @property
    def last(self) -> int:
        return self.first + self.hi - self.lo - 1


@dataclass(frozen=True)
class _Pair:
    q: _Run
    k: _Run
    kind: _Kind


def _runs(index: list[int], doc: Tensor | None, valid: Tensor | None, cap: int) -> list[_Run]:
    """Split one block's true indices into runs of consecutive indices, cut at the block's middle
    too, and every ``cap`` tokens from each run's start.

    The middle cut keeps the two zigzag halves apart where they touch (the last ring rank holds
    blocks ``R - 1`` and ``R``, consecutive), so every rank's causal work is the same, and lets a
    contiguous block's causal diagonal skip its upper quarter. Cutting from each run's start keeps
    the zigzag halves tiled alike, so the balance holds.
    """
    runs, lo, half = [], 0, (len(index) + 1) // 2
    for pos in range(1, len(index) + 1):
        if (pos == len(index) or pos == half or pos - lo == cap
                or index[pos] != index[pos - 1] + 1):
            a, b = index[lo], index[pos - 1] + 1
            runs.append(_Run(
                lo=lo, hi=pos, first=a,
                doc_min=None if doc is None else doc[:, a:b].amin(-1),
                doc_max=None if doc is None else doc[:, a:b].amax(-1),
                valid_any=None if valid is None else valid[:, a:b].any(-1),
                valid_all=None if valid is None else valid[:, a:b].all(-1),
            ))
            lo = pos
    return runs


def _classify(q: _Run, k: _Run, causal: bool, window: int | None) -> _Kind | None:
    """``None`` when no query of run ``q`` may attend to any key of run ``k`` in any row, else
    whether the pair needs a mask. Decided from index ranges and per-row summaries only."""
    q0, q1, k0, k1 = q.first, q.last, k.first, k.last
    overlap = k0 <= q1 and q0 <= k1  # then the diagonal q == k is always allowed
    if causal:
        empty = k0 > q1 or (window is not None and q0 - k1 >= window)
        full = k1 <= q0 and (window is None or q1 - k0 < window)
    elif window is None:
        empty, full = False, True
    else:  # two-sided window |q - k| < window
        empty = k0 - q1 >= window or q0 - k1 >= window
        full = max(q1 - k0, k1 - q0) < window
    if empty:
        return None
    live: Tensor | bool = True  # per row: may some pair interact?
    whole: Tensor | bool = True  # per row: does every pair interact?
    if q.doc_min is not None:
        live = (q.doc_min <= k.doc_max) & (k.doc_min <= q.doc_max)
        whole = (q.doc_min == q.doc_max) & (k.doc_min == k.doc_max) & (q.doc_min == k.doc_min)
    if q.valid_any is not None:
        live = live & q.valid_any & k.valid_any
        whole = whole & q.valid_all & k.valid_all
    if not overlap and not bool(torch.as_tensor(live).any()):
        return None
    return _Kind.FULL if full and bool(torch.as_tensor(whole).all()) else _Kind.MASKED


def _plan(token_index: Sequence[Tensor], rank: int, metadata: SequenceMetadata, causal: bool,
          window: int | None, scores_per_pair_unit: int, cap: int) -> list[list[_Pair]]:
    """Pairs to compute at each ring step ``t`` (key block of ring rank ``(rank - t) % ring``)."""
    doc = None if metadata.doc_ids is None else metadata.doc_ids.detach().cpu()
    valid = None if metadata.valid is None else metadata.valid.detach().cpu()
    ring = len(token_index)
    runs = [_runs(ix.tolist(), doc, valid, cap) for ix in token_index]
    steps, skipped = [], 0
    for t in range(ring):
        pairs = []
        for qr in runs[rank]:
            for kr in runs[(rank - t) % ring]:
                kind = _classify(qr, kr, causal, window)
                if kind is None:
                    skipped += 1
                else:
                    pairs.append(_Pair(qr, kr, kind))
        steps.append(pairs)
    for stats in _recorders:
        computed = [p for step in steps for p in step]
        stats.computed_pairs += len(computed)
        stats.masked_pairs += sum(p.kind is _Kind.MASKED for p in computed)
        stats.skipped_pairs += skipped
        stats.scores_computed += scores_per_pair_unit * sum((p.q.hi - p.q.lo) * (p.k.hi - p.k.lo) for p in computed)
    return steps


# -- the ring -------------------------------------------------------------------------------------


class _Exchange:
    """Tensors in flight to the next ring rank and buffers arriving from the previous one."""

    def __init__(self, works: list, sent: tuple[Tensor, ...], received: tuple[Tensor, ...]) -> None:
        self._works, self._sent, self._received = works, sent, received  # sent buffers must outlive the exchange

    def wait(self) -> tuple[Tensor, ...]:
        for work in self._works:
            work.wait()
        return self._received


class _Ring:
    """Ring neighbours on ``group``: every exchange sends to ``rank + 1`` and receives from
    ``rank - 1`` (group ranks, translated to the global ranks point-to-point ops take)."""

    def __init__(self, group: ProcessGroup | None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            if group is not None:
                raise ValueError("ring_attention got a process group but torch.distributed is not initialised")
            self.group, self.size, self.rank = None, 1, 0
            return
        self.group = group if group is not None else dist.group.WORLD
        self.size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.next = dist.get_global_rank(self.group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(self.group, (self.rank - 1) % self.size)

    def start(self, tensors: tuple[Tensor, ...], tag: int) -> _Exchange:
        sent = tuple(t.contiguous() for t in tensors)
        received = tuple(torch.empty_like(t) for t in sent)
        ops = []
        for i, (s, r) in enumerate(zip(sent, received)):
            ops.append(dist.P2POp(dist.isend, s, self.next, self.group, tag + i))
            ops.append(dist.P2POp(dist.irecv, r, self.prev, self.group, tag + i))
        return _Exchange(dist.batch_isend_irecv(ops), sent, received)


# -- the kernel ---------------------------------------------------------------------------------------


@dataclass
class _Config:
    ring: _Ring
    plan: list[list[_Pair]]
    token_index: list[Tensor]  # on the metadata's device
    metadata: SequenceMetadata
    causal: bool
    window: int | None
    scaling: float
    softcap: float | None
    groups: int  # query heads per KV head


def _scores(cfg: _Config, q: Tensor, k: Tensor, pair: _Pair, owner: int) -> tuple[Tensor, Tensor | None]:
    """Scores of one pair, a fresh ``[b, Hkv, n_q * g, n_k]`` tensor (``-inf`` where masked), and
    ``tanh`` of the softcap (``None`` without one) for the backward.

    ``q``: ``[b, Hkv, s_q * g, d]`` this rank's queries already multiplied by ``scaling`` (rows =
    position-major, head-in-group minor); ``k``: ``[b, Hkv, s_k, d]`` the key block of ring rank ``owner``.
    """
    g = cfg.groups
    s = torch.matmul(q[:, :, pair.q.lo * g:pair.q.hi * g], k[:, :, pair.k.lo:pair.k.hi].transpose(-1, -2))
    tanh = None
    if cfg.softcap is not None:
        tanh = s.div_(cfg.softcap).tanh_()
        s = tanh * cfg.softcap
    if pair.kind is _Kind.MASKED:
        meta_device = cfg.token_index[0].device
        qi = cfg.token_index[cfg.ring.rank][pair.q.lo:pair.q.hi]
        ki = cfg.token_index[owner][pair.k.lo:pair.k.hi]
        rows = torch.arange(cfg.metadata.batch_size, device=meta_device)[:, None, None]
        allowed = cfg.metadata.mask_mod(cfg.window, cfg.causal)(rows, None, qi[None, :, None], ki[None, None, :])
        allowed = allowed.to(s.device)  # [b or 1, n_q, n_k]
        b, h, _, nk = s.shape
        s.view(b, h, -1, g, nk).masked_fill_(~allowed[:, None, :, None, :], float("-inf"))
    return s, tanh


def _forward(cfg: _Config, q: Tensor, k: Tensor, v: Tensor, sink_rows: Tensor | None) -> tuple[Tensor, Tensor]:
    """Output ``[b, Hkv, s_q * g, dv]`` and row log-sum-exp ``[b, Hkv, s_q * g]`` (internal layout)."""
    b, h, rows, _ = q.shape
    m = q.new_full((b, h, rows), float("-inf"))
    l = q.new_zeros((b, h, rows))
    acc = q.new_zeros((b, h, rows, v.shape[-1]))
    g, size = cfg.groups, cfg.ring.size
    q = q * cfg.scaling  # once per call instead of once per score
    kv = (k, v)
    for t in range(size):
        # start moving this block on before computing with it, so the transfer overlaps compute
        pending = cfg.ring.start(kv, _KV_TAG) if t < size - 1 else None
        owner = (cfg.ring.rank - t) % size
        for pair in cfg.plan[t]:
            s, _ = _scores(cfg, q, kv[0], pair, owner)
            r = slice(pair.q.lo * g, pair.q.hi * g)
            m_old = m[:, :, r]
            m_new = torch.maximum(m_old, s.amax(-1))
            # a row with no allowed key so far keeps m = -inf; shift by 0 there so exp gives 0, not NaN
            shift = m_new.masked_fill(torch.isinf(m_new), 0.0)
            alpha = (m_old - shift).exp_()
            p = s.sub_(shift[..., None]).exp_()
            l[:, :, r].mul_(alpha).add_(p.sum(-1))  # views: the running state updates in place
            acc[:, :, r].mul_(alpha[..., None]).add_(torch.matmul(p, kv[1][:, :, pair.k.lo:pair.k.hi]))
            m[:, :, r] = m_new
        if pending is not None:
            kv = pending.wait()
    lse = m + torch.log(l)  # every row allows at least its own key, so l > 0
    if sink_rows is not None:
        lse = torch.logaddexp(lse, sink_rows)
    return acc.mul_(torch.exp(m - lse)[..., None]), lse


def _backward(cfg: _Config, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
              dout: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``dq`` (internal layout), ``dk``, ``dv`` of this rank's blocks, and ``D = rowsum(dO * O)``."""
    g, size = cfg.groups, cfg.ring.size
    delta = (dout * out).sum(-1)
    dq = torch.zeros_like(q)
    q = q * cfg.scaling  # dK = dSᵀ (Q · scaling): the scaled queries serve the scores and dK alike
    kv = (k, v)
    grads_in_flight: _Exchange | None = None
    dk = dv = None
    for t in range(size):
        pending = cfg.ring.start(kv, _KV_TAG) if t < size - 1 else None
        owner = (cfg.ring.rank - t) % size
        kb, vb = kv
        dk, dv = torch.zeros_like(kb), torch.zeros_like(vb)  # this rank's share for the held block
        for pair in cfg.plan[t]:
            s, tanh = _scores(cfg, q, kb, pair, owner)
            r, c = slice(pair.q.lo * g, pair.q.hi * g), slice(pair.k.lo, pair.k.hi)
            p = s.sub_(lse[:, :, r, None]).exp_()
            ds = torch.matmul(dout[:, :, r], vb[:, :, c].transpose(-1, -2)).sub_(delta[:, :, r, None]).mul_(p)
            if tanh is not None:
                ds.mul_(tanh.mul_(tanh).neg_().add_(1))  # d softcap·tanh(x / softcap) / dx = 1 - tanh²
            dq[:, :, r] += torch.matmul(ds, kb[:, :, c]).mul_(cfg.scaling)
            dk[:, :, c] += torch.matmul(ds.transpose(-1, -2), q[:, :, r])
            dv[:, :, c] += torch.matmul(p.transpose(-1, -2), dout[:, :, r])
        if grads_in_flight is not None:
            # the accumulated gradient of the held block, from the ranks that held it before
            dk_in, dv_in = grads_in_flight.wait()
            dk, dv = dk.add_(dk_in), dv.add_(dv_in)
        if size > 1:
            # after the last step this hop returns each block's gradient to its owner
            grads_in_flight = cfg.ring.start((dk, dv), _GRAD_TAG)
        if pending is not None:
            kv = pending.wait()
    if grads_in_flight is not None:
        dk, dv = grads_in_flight.wait()
    assert dk is not None and dv is not None
    return dq, dk, dv, delta


def _rows(x: Tensor, kv_heads: int) -> Tensor:
    """``[b, Hq, s, d]`` -> ``[b, Hkv, s * g, d]``: the queries of one KV head as one matrix."""
    b, hq, s, d = x.shape
    return x.view(b, kv_heads, hq // kv_heads, s, d).transpose(2, 3).reshape(b, kv_heads, s * (hq // kv_heads), d)


def _unrows(x: Tensor, groups: int) -> Tensor:
    """Inverse of :func:`_rows` in HF's output layout: ``[b, Hkv, s * g, e]`` -> ``[b, s, Hq, e]``."""
    b, h, rows, e = x.shape
    return x.view(b, h, rows // groups, groups, e).permute(0, 2, 1, 3, 4).reshape(b, rows // groups, h * groups, e)


def _sink_rows(sinks: Tensor, kv_heads: int, seq: int, dtype: torch.dtype) -> Tensor:
    """``[Hq]`` -> ``[1, Hkv, s * g]``: each query row's sink logit."""
    g = sinks.shape[0] // kv_heads
    return sinks.to(dtype).view(1, kv_heads, 1, g).expand(1, kv_heads, seq, g).reshape(1, kv_heads, seq * g)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, value: Tensor, sinks: Tensor | None,  # type: ignore[override]
                cfg: _Config) -> Tensor:
        dtype = torch.promote_types(query.dtype, torch.float32)
        hkv, s_q = key.shape[1], query.shape[2]
        q = _rows(query.to(dtype), hkv)
        sink_rows = None if sinks is None else _sink_rows(sinks, hkv, s_q, dtype)
        out, lse = _forward(cfg, q, key.to(dtype).contiguous(), value.to(dtype).contiguous(), sink_rows)
        ctx.cfg = cfg
        ctx.save_for_backward(query, key, value, sinks, out, lse)
        return _unrows(out, cfg.groups).to(query.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        query, key, value, sinks, out, lse = ctx.saved_tensors
        cfg: _Config = ctx.cfg
        dtype = out.dtype
        b, s_q, hq, dv_dim = grad_out.shape
        hkv = key.shape[1]
        q = _rows(query.to(dtype), hkv)
        dout = grad_out.to(dtype).view(b, s_q, hkv, cfg.groups, dv_dim).permute(0, 2, 1, 3, 4)
        dout = dout.reshape(b, hkv, s_q * cfg.groups, dv_dim)
        dq, dk, dv, delta = _backward(cfg, q, key.to(dtype).contiguous(), value.to(dtype).contiguous(), out, lse, dout)
        dsinks = None
        if sinks is not None:
            # d lse / d sink = exp(sink - lse) and dO . dO/d sink = -exp(sink - lse) * D per row;
            # this rank's rows only: the sink is replicated, its gradient sums over ranks like a weight's
            p_sink = torch.exp(_sink_rows(sinks, hkv, s_q, dtype) - lse)
            dsinks = (-(p_sink * delta)).view(b, hkv, s_q, cfg.groups).sum((0, 2)).reshape(hq).to(sinks.dtype)
        dquery = _unrows(dq, cfg.groups).transpose(1, 2).to(query.dtype)
        return dquery, dk.to(key.dtype), dv.to(value.dtype), dsinks, None


def ring_attention(query: Tensor, key: Tensor, value: Tensor, *, group: ProcessGroup | None,
                   metadata: SequenceMetadata, token_index: Sequence[Tensor], causal: bool = True,
                   sliding_window: int | None = None, scaling: float | None = None,
                   softcap: float | None = None, sinks: Tensor | None = None) -> Tensor:
    """Exact attention of this ring rank's queries over the whole sequence, K/V passed round the ring.

    Runs point-to-point exchanges on ``group`` (size ``R``); every rank of the group must call it
    with the same shapes, ``metadata`` and ``token_index``. ``group=None`` is the default group,
    or a ring of one process when ``torch.distributed`` is not initialised.

    Args:
        query: ``[b, Hq, s_blk, d]`` this rank's block of tokens (HF's layout before the backend).
        key: ``[b, Hkv, s_blk, d]``; ``Hq % Hkv == 0``, KV head ``i`` serving query heads
            ``i*Hq/Hkv .. (i+1)*Hq/Hkv - 1`` (as HF's ``repeat_kv``).
        value: ``[b, Hkv, s_blk, dv]`` (``dv`` may differ from ``d``).
        group: the ring process group; this rank's block is ``token_index[group rank]``.
        metadata: the FULL sequence's metadata in true token order (``[b, seq]`` fields), the same
            on every rank; its :meth:`~SequenceMetadata.mask_mod` is the attention rule.
        token_index: ``R`` long ``[s_blk]`` tensors, the true token indices held by each ring rank
            (a partition of ``range(seq)``, the same for every batch row).
        causal: causal attention (``k <= q``) or not.
        sliding_window: the window of :meth:`SequenceMetadata.mask_mod`, or ``None``.
        scaling: score scale; default ``d ** -0.5``.
        softcap: scores become ``softcap * tanh(scores / softcap)`` before masking (Gemma 2).
        sinks: ``[Hq]`` per-head logits joining every row's softmax denominator (GPT-OSS). Its
            gradient is this rank's query rows' share (sum it over the ring like a weight's).

    Returns:
        ``[b, s_blk, Hq, dv]`` (HF backends' output layout) in ``query``'s dtype; computed in at
        least float32.
    """
    ring = _Ring(group)
    b, hq, s_blk, d = query.shape
    if key.dim() != 4 or value.dim() != 4 or key.shape[0] != b or key.shape[2] != s_blk or key.shape[3] != d:
        raise ValueError(f"key {tuple(key.shape)} must be [b, Hkv, s_blk, d] for query {tuple(query.shape)}")
    if value.shape[:3] != key.shape[:3]:
        raise ValueError(f"value {tuple(value.shape)} must be [b, Hkv, s_blk, dv] for key {tuple(key.shape)}")
    hkv = key.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads {hq} are not a multiple of key/value heads {hkv}")
    if sinks is not None and tuple(sinks.shape) != (hq,):
        raise ValueError(f"sinks {tuple(sinks.shape)} must be [Hq] = [{hq}]")
    if len(token_index) != ring.size:
        raise ValueError(f"token_index has {len(token_index)} blocks for a ring of {ring.size} ranks")
    if any(tuple(ix.shape) != (s_blk,) for ix in token_index):
        raise ValueError(f"every token_index block must be [s_blk] = [{s_blk}], got "
                         f"{[tuple(ix.shape) for ix in token_index]}")
    if metadata.batch_size != b:
        raise ValueError(f"metadata has batch {metadata.batch_size}, the query {b}")
    if getattr(metadata, "blocks", None) is not None:
        # the skip rule reads causality, windows, documents and padding only: a future key block can
        # hold the rest of a query's image, so skipping it would silently drop attention
        raise ValueError(
            "bidirectional blocks (image tokens attending to each other both ways: Gemma 3's / PaliGemma's "
            "token_type_ids) are not supported across ring ranks; run this model with ring=1 (an sp its heads "
            "allow), or call it without token_type_ids (causal attention over image tokens too).")
    everything = torch.cat([ix.detach().cpu() for ix in token_index]).sort().values
    if not torch.equal(everything, torch.arange(metadata.seq_len)):
        raise ValueError(f"token_index blocks must partition range({metadata.seq_len}) (the full sequence of "
                         "metadata): every token on exactly one ring rank")
    device = metadata.position_ids.device
    index = [ix.to(device=device, dtype=torch.long) for ix in token_index]
    cfg = _Config(
        ring=ring,
        plan=_plan(index, ring.rank, metadata, causal, sliding_window, scores_per_pair_unit=b * hq,
                   cap=_max_run(query.device)),
        token_index=index, metadata=metadata, causal=causal, window=sliding_window,
        scaling=d ** -0.5 if scaling is None else float(scaling),
        softcap=None if softcap is None else float(softcap), groups=hq // hkv,
    )
    if cfg.softcap is not None and not (math.isfinite(cfg.softcap) and cfg.softcap > 0):
        raise ValueError(f"softcap must be a positive number, got {softcap}")
    return _RingAttention.apply(query, key, value, sinks, cfg)

"""Attention on the pieces of the sequence that interact, instead of a dense ``[s, s]`` mask.

After the all-to-all every rank holds the **full** sequence for its heads, so for sdpa and eager the
backend can be called on exactly the pieces that attend to each other (README, "Masks by backend"):

* each packed document (its real tokens, in order) is causal attention on its own: sdpa runs it
  with ``is_causal=True`` and no mask tensor, eager with a causal mask of the document's length;
* a padding token attends to itself only (the rule of :mod:`.masks`), so padding is a batch of
  one-token calls that never touches the real tokens;
* a document longer than its layer's sliding window is cut into query blocks, each called against
  its band of keys ``[block_start - window + 1, block_end)`` with a ``[block, block + window - 1]``
  mask built by :meth:`SequenceMetadata.mask_mod` — the one definition of the rule.

Pieces of (about) equal length are batched into one call: a piece is right-padded to its length
bucket, which is exact for causal attention (no real query looks to its right; padded queries are
dropped). Long pieces run alone on views of the input, so they cost no copy. Nothing here builds a
tensor that grows with ``s²``; eager still materialises its own ``[pieces, heads, L, L]`` weights
per piece of length ``L``.

Patterns not covered (non-causal attention, bidirectional blocks, backends other than sdpa/eager) return ``None`` from
:func:`plan_segments` and keep the dense path of :mod:`.masks`. :func:`dense_masks` forces the dense
path (the reference the tests and benchmarks compare against), and :func:`attention_paths` says
which path ran for every (backend, window, causal) of a forward.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .masks import SequenceMetadata

logger = logging.getLogger(__name__)

SEGMENT_BACKENDS = ("sdpa", "eager")
# Pieces at least this long run alone on views of the input: batching them would copy Q/K/V (and
# raise the peak above plain causal attention's), while one call per piece already amortises the
# call overhead. Shorter pieces are gathered and batched (measured in benchmarks/README.md).
SOLO_MIN_LEN = 256
# Length buckets: a piece of length L is right-padded to a multiple of 2**(floor(log2 L) - BITS),
# i.e. at most 1/2**BITS longer (about 2**BITS buckets per doubling of the length).
BUCKET_BITS = 4

# Sliding windows: query blocks of window / BAND_BLOCK_DIVISOR tokens, each against
# block + window - 1 keys; smaller blocks compute fewer masked-out scores but copy more keys.
BAND_BLOCK_DIVISOR = 4

_dense_depth = 0
_logged: set[tuple[str, str]] = set()

PathKey = tuple[str, Any, bool]


@contextlib.contextmanager
def dense_masks() -> Iterator[None]:
    """Run sdpa/eager attention with the dense ``[b, 1, s, s]`` mask inside the block (the path
    before segments; a reference for tests and benchmarks). Affects this process only."""
    global _dense_depth
    _dense_depth += 1
    try:
        yield
    finally:
        _dense_depth -= 1


def attention_paths(metadata: "SequenceMetadata") -> dict[PathKey, str]:
    """Which path each ``(backend, sliding_window, causal)`` of this forward took.

    Values: ``"segments"`` (documents/padding as separate causal calls), ``"segments+bands"``
    (and sliding-window bands), ``"causal"`` (sdpa's plain ``is_causal``, no mask), ``"dense"``
    (the full ``[b, 1, s, s]`` mask), ``"block_mask"`` (flex) or ``"kernel"`` (flash: varlen or padding).
    """
    return dict(metadata._cache.setdefault("paths", {}))


def record_path(metadata: "SequenceMetadata", backend: str, sliding_window: int | None, causal: bool,
                path: str) -> None:
    """Remember the path of ``(backend, sliding_window, causal)`` for :func:`attention_paths` and
    log it once per process and (backend, path)."""
    metadata._cache.setdefault("paths", {})[(backend, sliding_window, causal)] = path
    if (backend, path) not in _logged:
        _logged.add((backend, path))
        logger.debug("Ulysses attention: backend %s runs the %s path (sliding_window=%s, causal=%s)",
                     backend, path, sliding_window, causal)


def _bucket(length: Tensor) -> Tensor:
    """Padded length of pieces of ``length`` tokens (int64 tensor, elementwise)."""
    exp = torch.floor(torch.log2(length.double())).long() - BUCKET_BITS
    granule = torch.pow(2, exp.clamp(min=0))
    return (length + granule - 1) // granule * granule


@dataclass
class _Group:
    """One backend call. ``kind``: ``"solo"`` (one piece, input is a view), ``"causal"`` (pieces
    gathered by ``q_idx`` ``[n, L]``, causal) or ``"band"`` (query blocks ``q_idx`` ``[n, B]``
    against key bands ``k_idx`` ``[n, K]`` under ``mask`` ``[n, 1, B, K]``, or ``[1, 1, B, K]``
    shared by blocks with the plain band pattern)."""

    kind: str
    length: int
    q_idx: Tensor | None = None
    k_idx: Tensor | None = None
    mask: Tensor | None = None
    run: int = -1  # the run whose input view a "solo" group takes
    _additive: dict = field(default_factory=dict)

    def eager_mask(self, dtype: torch.dtype, device: torch.device, causal_masks: dict) -> Tensor:
        """The additive mask eager adds to its scores: the band's ``[n, 1, B, K]``, or a causal
        ``[1, 1, L, L]`` shared through ``causal_masks`` by every group of length ``L``."""
        if self.kind == "band":
            if dtype not in self._additive:
                assert self.mask is not None
                self._additive[dtype] = _additive(self.mask, dtype)
            return self._additive[dtype]
        key = (self.length, dtype)
        if key not in causal_masks:
            n = self.length
            causal_masks[key] = _additive(torch.ones(n, n, dtype=torch.bool, device=device).tril()[None, None], dtype)
        return causal_masks[key]


def _additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


@dataclass
class SegmentPlan:
    """How one (metadata, sliding window) pattern is executed as separate backend calls.

    The flattened sequence ``[batch * seq]`` is cut into ``runs``: consecutive tokens whose outputs
    are consecutive rows of one group's flattened output. Concatenating the runs in order gives the
    output in sequence order; splitting the inputs at the same boundaries gives the solo pieces'
    inputs as views.
    """

    path: str
    batch: int
    seq: int
    groups: list[_Group]
    run_lengths: list[int]
    run_sources: list[tuple[int, int]]  # (group, offset into its flattened output) per run
    _causal_masks: dict = field(default_factory=dict)  # eager: (length, dtype) -> [1, 1, L, L]

    def bind(self, make_call: Callable[[Any, dict[str, Any]], Callable[..., Tensor]],
             backend: str) -> Callable[[Tensor, Tensor, Tensor, int], Tensor]:
        """``attend(q, k, v, kv_groups) -> out``, the drop-in for the dense call.

        Args:
            make_call: ``make_call(mask, extra_kwargs)`` returns the backend call
                ``(q, k, v, kv_groups) -> out`` (attention.py's ``_backend_call``), so the model's
                own function (scaling, dropout, sinks, softcapping) runs on every piece.
            backend: ``"sdpa"`` or ``"eager"``.

        ``attend`` takes ``q: [batch, heads, seq, head_dim]``, ``k/v: [batch, kv_heads, seq, head_dim]``
        (full sequence, this rank's heads) and returns ``[batch, seq, heads, v_head_dim]``.
        """
        causal_call = make_call(None, {"is_causal": True} if backend == "sdpa" else {})

        def attend(q: Tensor, k: Tensor, v: Tensor, kv_groups: int) -> Tensor:
            with torch.profiler.record_function(f"ulysses/attention/segments/{backend}"):
                return self._run(q, k, v, kv_groups, causal_call, make_call, backend)

        return attend

    def _run(self, q: Tensor, k: Tensor, v: Tensor, kv_groups: int, causal_call: Callable[..., Tensor],
             make_call: Callable[..., Callable[..., Tensor]], backend: str) -> Tensor:
        b, s = self.batch, self.seq
        # [b, h, s, d] -> [b*s, h, d]: a view when the exchange hands over its [b, s, h, d] buffer.
        flat = [x.transpose(1, 2).reshape(b * s, x.shape[1], x.shape[3]) for x in (q, k, v)]
        views = None
        if any(g.kind == "solo" for g in self.groups):
            views = [x.split(self.run_lengths) for x in flat]  # one autograd node per tensor
        outs: list[Tensor] = []
        for g in self.groups:
            if g.kind == "solo":
                assert views is not None
                qi, ki, vi = (part[g.run][None].transpose(1, 2) for part in views)
            elif g.kind == "causal":
                assert g.q_idx is not None
                qi, ki, vi = (x[g.q_idx].transpose(1, 2) for x in flat)
            else:
                assert g.q_idx is not None and g.k_idx is not None
                qi = flat[0][g.q_idx].transpose(1, 2)
                ki, vi = (x[g.k_idx].transpose(1, 2) for x in flat[1:])
            if g.kind == "band":
                mask = g.mask if backend == "sdpa" else g.eager_mask(q.dtype, q.device, self._causal_masks)
                call = make_call(mask, {"is_causal": False} if backend == "sdpa" else {})
            elif backend == "eager":
                call = make_call(g.eager_mask(q.dtype, q.device, self._causal_masks), {})
            else:
                call = causal_call
            out = call(qi, ki, vi, kv_groups)  # [n, L, h, dv]
            outs.append(out.reshape(-1, out.shape[2], out.shape[3]))
        parts = [outs[gi].narrow(0, off, n) for (gi, off), n in zip(self.run_sources, self.run_lengths)]
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out.view(b, s, out.shape[1], out.shape[2])


def plan_segments(metadata: "SequenceMetadata", backend: str, sliding_window: int | None,
                  causal: bool) -> SegmentPlan | None:
    """The segment plan of this forward's pattern for ``backend``, or ``None`` for the dense path.

    Cached on ``metadata`` (once per forward and sliding window); records the path taken
    (:func:`attention_paths`).
    """
    if backend not in SEGMENT_BACKENDS:
        own = "block_mask" if backend == "flex_attention" else "kernel"  # flash: varlen / padding mask
        record_path(metadata, backend, sliding_window, causal, own)
        return None
    if _dense_depth or not causal or metadata.blocks is not None:
        # Non-causal (encoder) patterns and bidirectional blocks (Gemma 3's image tokens) are not
        # planned here: the dense mask stays exact for them.
        record_path(metadata, backend, sliding_window, causal, "dense")
        return None
    if backend == "sdpa" and metadata.is_plain(sliding_window):
        record_path(metadata, backend, sliding_window, causal, "causal")  # is_causal, no mask at all
        return None
    key = ("segments", sliding_window)
    if key not in metadata._cache:
        metadata._cache[key] = _build_plan(metadata, sliding_window)
    plan = metadata._cache[key]
    record_path(metadata, backend, sliding_window, causal, plan.path)
    return plan


def _build_plan(meta: "SequenceMetadata", window: int | None) -> SegmentPlan:
    """Cut the pattern of ``meta`` (documents, padding, ``window``) into backend calls.

    Per row, a document span's real tokens run as one causal piece when the window cannot cut
    them (``window`` is None or at least the distance from its first to its last real token + 1);
    otherwise that stretch runs as query blocks against key bands. Padding tokens outside banded
    stretches are one-token pieces. Everything is planned with tensor ops plus a handful of host
    reads (group counts, run boundaries), once per forward and window.
    """
    b, s = meta.batch_size, meta.seq_len
    n_tok = b * s
    device = meta.position_ids.device
    t = torch.arange(n_tok, device=device)
    row = t // s
    doc = meta.doc_ids.reshape(-1) if meta.doc_ids is not None else torch.zeros_like(t)
    valid = meta.valid.reshape(-1) if meta.valid is not None else torch.ones(n_tok, dtype=torch.bool, device=device)

    # Document spans: maximal runs of one (row, document).
    span_key = row * (s + 1) + doc
    new_span = torch.ones_like(valid)
    new_span[1:] = span_key[1:] != span_key[:-1]
    span = new_span.long().cumsum(0) - 1
    n_span = int(span[-1]) + 1
    big = torch.full((n_span,), n_tok, device=device)
    first = big.scatter_reduce(0, span, torch.where(valid, t, n_tok), "amin")
    last = torch.full((n_span,), -1, device=device).scatter_reduce(0, span, torch.where(valid, t, -1), "amax")
    count = torch.zeros(n_span, dtype=torch.long, device=device).scatter_add(0, span, valid.long())
    core = torch.where(count > 0, last - first + 1, torch.zeros_like(count))
    banded_span = core > window if window is not None else torch.zeros_like(valid[:n_span])
    in_band = banded_span[span] & (t >= first[span]) & (t <= last[span])

    group_of = torch.full((n_tok,), -1, device=device)
    offset = torch.zeros(n_tok, dtype=torch.long, device=device)
    groups: list[_Group] = []

    # -- causal pieces: a span's real tokens (outside bands) and every other padding token --------
    piece_tok = ~in_band
    real_piece = piece_tok & valid
    # Sort key: the span's real tokens share one key; a padding token gets its own, after them.
    key = span * (n_tok + 1) + torch.where(real_piece, torch.zeros_like(t), t + 1)
    toks = t[piece_tok]
    if toks.numel():
        order = torch.sort(key[toks], stable=True).indices
        toks = toks[order]  # grouped by piece, in sequence order within a piece
        pkey = key[toks]
        _, lengths = torch.unique_consecutive(pkey, return_counts=True)
        starts = lengths.cumsum(0) - lengths
        piece_of = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)
        rank = torch.arange(toks.numel(), device=device) - starts[piece_of]
        contiguous = (toks[starts + lengths - 1] - toks[starts] + 1) == lengths
        solo = contiguous & (lengths >= SOLO_MIN_LEN)
        padded = _bucket(lengths)
        # Solo pieces first (each its own group), then one group per bucket length.
        solo_ids = torch.nonzero(solo).flatten()
        solo_rank = torch.full((lengths.numel(),), -1, device=device)
        solo_rank[solo_ids] = torch.arange(solo_ids.numel(), device=device)
        tok_solo = solo[piece_of]
        group_of[toks[tok_solo]] = len(groups) + solo_rank[piece_of[tok_solo]]
        offset[toks[tok_solo]] = rank[tok_solo]
        groups += [_Group("solo", n) for n in lengths[solo_ids].tolist()]
        batched = ~solo
        for lb in torch.unique(padded[batched]).tolist():
            members = torch.nonzero(batched & (padded == lb)).flatten()
            j = torch.arange(lb, device=device)
            # Right-pad each piece to lb with its last token: causal attention keeps real queries
            # exact, and the padded queries' outputs are never read.
            slot = starts[members, None] + torch.minimum(j[None, :], lengths[members, None] - 1)
            idx = toks[slot]  # [n, lb]
            index_in_group = torch.full((lengths.numel(),), -1, device=device)
            index_in_group[members] = torch.arange(members.numel(), device=device)
            tok_sel = batched[piece_of] & (padded[piece_of] == lb)
            sel = toks[tok_sel]
            group_of[sel] = len(groups)
            offset[sel] = index_in_group[piece_of[tok_sel]] * lb + rank[tok_sel]
            groups.append(_Group("causal", int(lb), q_idx=idx))

    # -- sliding-window bands ----------------------------------------------------------------------
    bands = torch.nonzero(banded_span).flatten()
    if bands.numel():
        assert window is not None
        block = max(1, window // BAND_BLOCK_DIVISOR)
        kv_len = block + window - 1
        lo, hi = first[bands], last[bands]  # [n_bands], inclusive core bounds
        n_blocks = (hi - lo + 1 + block - 1) // block
        band_of_block = torch.repeat_interleave(torch.arange(bands.numel(), device=device), n_blocks)
        block_base = n_blocks.cumsum(0) - n_blocks  # first block index of every band
        m = torch.arange(band_of_block.numel(), device=device) - block_base[band_of_block]
        q0 = lo[band_of_block] + m * block  # [n] first query of every block
        b_lo, b_hi = lo[band_of_block, None], hi[band_of_block, None]
        q_pos = q0[:, None] + torch.arange(block, device=device)
        k_pos = q0[:, None] - window + 1 + torch.arange(kv_len, device=device)
        q_idx, k_idx = torch.minimum(q_pos, b_hi), k_pos.clamp(min=b_lo, max=b_hi)
        # A block whose band lies inside its stretch and holds no padding sees the plain band
        # pattern: one [1, 1, block, kv_len] mask serves all such blocks (no [n, block, kv_len]
        # mask, nor sdpa's float copy of it). The others get their own masks.
        padding_before = torch.nn.functional.pad((~valid).long().cumsum(0), (1, 0))  # [n_tok + 1]
        k_first, q_last = k_pos[:, 0], q_pos[:, -1]
        inside = (k_first >= b_lo[:, 0]) & (q_last <= b_hi[:, 0])
        plain = inside & (padding_before[q_last.clamp(max=n_tok - 1) + 1] == padding_before[k_first.clamp(min=0)])
        rule = meta.mask_mod(window, True)
        block_group = torch.empty_like(q0)
        index_in_group = torch.empty_like(q0)
        for is_plain in (True, False):
            members = torch.nonzero(plain == is_plain).flatten()
            if not members.numel():
                continue
            block_group[members] = len(groups)
            index_in_group[members] = torch.arange(members.numel(), device=device)
            shown = members[:1] if is_plain else members  # the plain pattern, from the rule itself
            r = (q0[shown] // s)[:, None, None]
            allowed = rule(r, None, (q_idx[shown] - r[:, :, 0] * s)[:, :, None], (k_idx[shown] - r[:, :, 0] * s)[:, None, :])
            k_in = (k_pos[shown] >= b_lo[shown]) & (k_pos[shown] <= b_hi[shown])
            mask = (allowed & k_in[:, None, :])[:, None]  # [n or 1, 1, block, kv_len]
            groups.append(_Group("band", block, q_idx=q_idx[members], k_idx=k_idx[members], mask=mask))
        sel = t[in_band]
        band_id = torch.searchsorted(bands, span[sel])
        rel = sel - lo[band_id]
        blk = block_base[band_id] + rel // block
        group_of[sel] = block_group[blk]
        offset[sel] = index_in_group[blk] * block + rel % block

    # -- runs: consecutive tokens read from consecutive rows of one group's output -----------------
    brk = torch.ones_like(valid)
    brk[1:] = (group_of[1:] != group_of[:-1]) | (offset[1:] != offset[:-1] + 1)
    run_start = torch.nonzero(brk).flatten()
    run_len = torch.diff(run_start, append=torch.tensor([n_tok], device=device))
    sources = list(zip(group_of[run_start].tolist(), offset[run_start].tolist()))
    for i, (gi, _) in enumerate(sources):
        if groups[gi].kind == "solo":
            groups[gi].run = i
    path = "segments+bands" if bands.numel() else "segments"
    return SegmentPlan(path, b, s, groups, run_len.tolist(), sources)

"""Full-sequence attention masks rebuilt from compact metadata.

Under SP, the mask HF prepares inside the model describes a local chunk and is meaningless after
the all-to-all. Instead, the forward hook gathers ``[batch, seq]`` metadata once per forward
(global ``position_ids`` and the padding mask) and this module derives, per backend and per
sliding window, exactly what the backend needs for the **full** sequence:

* ``sdpa`` — ``None`` plus ``is_causal`` for a plain causal pattern, else a boolean
  ``[batch, 1, seq, seq]`` mask (True = attend);
* ``eager`` — an additive float ``[batch, 1, seq, seq]`` mask;
* ``flex_attention`` — a ``BlockMask`` from an index-based ``mask_mod``;
* ``flash_attention_*`` — a ``[batch, seq]`` padding mask or varlen ``cu_seq_lens`` for packed
  documents; the sliding window is passed to the kernel.

The rule, identical for every backend, for query index ``q`` and key index ``k`` of one row:
``k <= q`` (causal) and ``doc[k] == doc[q]`` (packed documents: a new document starts wherever the
position id does not increase by exactly one) and ``k > q - window`` (sliding window) and
``valid[k]`` (padding). A padding query attends to itself only, so that its softmax row is never
empty (a NaN there would poison the backward even though its label is ignored) and so that padding
is a pattern of its own that the segment path (:mod:`.segments`) runs without any mask; real tokens
are unaffected because their own diagonal is always allowed and no real query reads a padding key.

Optional **blocks** (``SequenceMetadata.blocks``, ``[batch, seq]``): tokens with the same non-negative
block id attend to each other regardless of causality — Gemma 3's image tokens (one block per image,
from ``token_type_ids``), PaliGemma's prefix (one block). Where the block relaxes the rule depends on
the model (``blocks_windowed``): Gemma 3 ORs it into the causal term *inside* the sliding window and
the document test (``(causal | block) & window & doc``), PaliGemma ORs it in after them
(``(causal & window & doc) | block``). Padding stays masked either way. Blocks are expressed by the
dense mask (sdpa, eager) and the ``mask_mod`` (flex); flash kernels take causality per call, not per
token pair, so blocks are refused there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

SDPA_LIKE = ("sdpa", "eager")
FLASH_PREFIX = "flash_attention"
FLEX = "flex_attention"
SUPPORTED_BACKENDS = ("sdpa", "eager", FLEX, "flash_attention_2", "flash_attention_3")


def document_ids(position_ids: Tensor) -> Tensor | None:
    """``[batch, seq]`` document index per token, or ``None`` when each row is one document.

    A new document starts wherever ``position_ids`` does not increase by exactly one (the packed
    format HF's ``DataCollatorWithFlattening`` produces).
    """
    step = torch.diff(position_ids, dim=-1) != 1
    if not bool(step.any()):
        return None
    starts = torch.nn.functional.pad(step, (1, 0), value=False)
    return starts.long().cumsum(-1)


@dataclass
class SequenceMetadata:
    """What attention needs to know about the full sequence, gathered once per forward.

    Attributes:
        position_ids: ``[batch, seq]`` global positions (after the gather, identical on SP ranks).
        valid: ``[batch, seq]`` bool, True for real tokens; ``None`` when there is no padding.
        doc_ids: ``[batch, seq]`` document index; ``None`` when every row is one document.
        blocks: ``[batch, seq]`` block id per token (``-1``: in no block): tokens of one block attend
            to each other both ways; ``None`` when there are none. Not carried into :meth:`chunked`.
        blocks_windowed: the sliding window (and the document test) limits a block too (Gemma 3), or
            the block is added after them (PaliGemma's prefix).
    """

    position_ids: Tensor
    valid: Tensor | None = None
    doc_ids: Tensor | None = None
    blocks: Tensor | None = None
    blocks_windowed: bool = True
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_gathered(cls, position_ids: Tensor, valid: Tensor | None) -> "SequenceMetadata":
        if valid is not None and bool(valid.all()):
            valid = None
        return cls(position_ids=position_ids, valid=valid, doc_ids=document_ids(position_ids))

    def chunked(self, chunk_size: int) -> "SequenceMetadata":
        """The metadata of chunked local attention (``attention_chunk_size``): tokens attend only
        inside their chunk of ``chunk_size`` tokens, counted from each row's first real token (as
        transformers' chunked mask counts them past left padding), or from each packed document's
        first token. Chunk borders are document
        borders, so every backend path that honours packed documents honours chunks, and the
        positions restart at each border so flash's packed-sequence detection sees them too."""
        key = ("chunked", chunk_size)
        if key not in self._cache:
            b, s = self.batch_size, self.seq_len
            device = self.position_ids.device
            if self.doc_ids is not None:
                # packed rows: transformers remaps each token's index to its position inside its
                # document before the chunk test, so chunks restart at every document
                idx = self.position_ids
            else:
                idx = torch.arange(s, device=device).expand(b, s)
                if self.valid is not None:
                    left = (self.valid.long().cumsum(-1) == 0).sum(-1, keepdim=True)
                    idx = idx - left
            chunk = torch.div(idx, chunk_size, rounding_mode="floor")
            doc = self.doc_ids if self.doc_ids is not None else torch.zeros_like(chunk)
            run = doc * (2 * s + 2) + chunk + s  # non-decreasing along the row: one run per (document, chunk)
            starts = torch.nn.functional.pad(torch.diff(run, dim=-1) != 0, (1, 0), value=True)
            run_id = starts.long().cumsum(-1) - 1
            first = torch.zeros_like(run_id).scatter_reduce(
                1, run_id, torch.arange(s, device=device).expand(b, s), reduce="amin", include_self=False)
            positions = torch.arange(s, device=device) - first.gather(1, run_id)
            self._cache[key] = SequenceMetadata(position_ids=positions, valid=self.valid,
                                                doc_ids=document_ids(positions))
        return self._cache[key]

    @property
    def batch_size(self) -> int:
        return self.position_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.position_ids.shape[1]

    def is_plain(self, sliding_window: int | None) -> bool:
        """True when the full pattern is plain causal attention (no padding, packing or window)."""
        no_window = sliding_window is None or sliding_window >= self.seq_len
        return self.valid is None and self.doc_ids is None and self.blocks is None and no_window

    # -- the rule, in two forms sharing one definition ---------------------------------------

    def mask_mod(self, sliding_window: int | None, causal: bool = True) -> Callable[..., Tensor]:
        """Index-based ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (flex_attention convention)."""
        doc, valid, blocks, windowed = self.doc_ids, self.valid, self.blocks, self.blocks_windowed

        def allowed(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
            ok = (k <= q) if causal else (k >= 0)
            same_block = None
            if blocks is not None:
                block = blocks[b, q]
                same_block = (block >= 0) & (blocks[b, k] == block)
                if windowed:
                    ok = ok | same_block
            if sliding_window is not None:
                ok = ok & (k > q - sliding_window)
                if not causal:  # encoders' local attention is two-sided: |q - k| < window
                    ok = ok & (k < q + sliding_window)
            if doc is not None:
                ok = ok & (doc[b, k] == doc[b, q])
            if same_block is not None and not windowed:
                ok = ok | same_block
            if valid is not None:
                ok = ok & valid[b, k] & valid[b, q]
            return ok | (q == k)

        return allowed

    def dense_mask(self, sliding_window: int | None, causal: bool = True) -> Tensor:
        """Boolean ``[batch, 1, seq, seq]`` mask (True = attend) built by broadcasting ``mask_mod``."""
        key = ("dense", sliding_window, causal)
        if key not in self._cache:
            device = self.position_ids.device
            b = torch.arange(self.batch_size, device=device)[:, None, None]
            idx = torch.arange(self.seq_len, device=device)
            mask = self.mask_mod(sliding_window, causal)(b, None, idx[None, :, None], idx[None, None, :])
            self._cache[key] = mask.expand(self.batch_size, self.seq_len, self.seq_len)[:, None]
        return self._cache[key]

    # -- per backend --------------------------------------------------------------------------

    def for_backend(
        self, backend: str, sliding_window: int | None, causal: bool, dtype: torch.dtype
    ) -> tuple[Tensor | Any | None, dict[str, Any]]:
        """Return ``(attention_mask, extra_kwargs)`` to call ``backend`` on the full sequence.

        Raises:
            ValueError: for a mask the backend cannot express (never silently dropped).
        """
        if backend == "sdpa":
            if causal and self.is_plain(sliding_window):
                return None, {"is_causal": True}
            return self.dense_mask(sliding_window, causal), {"is_causal": False}
        if backend == "eager":
            key = ("additive", sliding_window, causal, dtype)
            if key not in self._cache:
                allowed = self.dense_mask(sliding_window, causal)
                zero = torch.zeros((), dtype=dtype, device=allowed.device)
                self._cache[key] = torch.where(allowed, zero, torch.finfo(dtype).min)
            return self._cache[key], {}
        if backend == FLEX:
            return self._block_mask(sliding_window, causal), {}
        if backend in SUPPORTED_BACKENDS and backend.startswith(FLASH_PREFIX):
            return self._flash(sliding_window, causal)
        raise ValueError(
            f"attention backend {backend!r} is not supported under Ulysses SP; "
            f"use one of {SUPPORTED_BACKENDS} (attn_implementation=...)."
        )

    def _block_mask(self, sliding_window: int | None, causal: bool) -> Any:
        key = ("block", sliding_window, causal)
        if key not in self._cache:
            from torch.nn.attention.flex_attention import create_block_mask

            self._cache[key] = create_block_mask(
                self.mask_mod(sliding_window, causal),
                B=self.batch_size,
                H=None,
                Q_LEN=self.seq_len,
                KV_LEN=self.seq_len,
                device=self.position_ids.device,
            )
        return self._cache[key]

    def _flash(self, sliding_window: int | None, causal: bool) -> tuple[Tensor | None, dict[str, Any]]:
        # flash kernels take the sliding window as an argument and causality from the module;
        # only padding and document boundaries need translating.
        if not causal:
            raise ValueError("non-causal attention under SP is supported on sdpa/eager/flex_attention only.")
        if self.blocks is not None:
            raise ValueError(
                "bidirectional blocks (image tokens attending to each other both ways: Gemma 3's / PaliGemma's "
                "token_type_ids) cannot be expressed for flash attention under SP: its kernels take causality per "
                "call, not per pair of tokens. Use attn_implementation='flex_attention' (or sdpa), or call the "
                "model without token_type_ids (causal attention over image tokens too)."
            )
        if self.valid is not None and self.doc_ids is not None:
            raise ValueError(
                "padding together with packed documents cannot be expressed for flash attention under SP; "
                "drop the attention_mask (packed rows need no padding) or use attn_implementation='flex_attention'."
            )
        if self.valid is not None:
            return self.valid.to(torch.int32), {}
        if self.doc_ids is None:
            return None, {}
        key = ("varlen",)
        if key not in self._cache:
            self._cache[key] = varlen_kwargs(self.doc_ids)
        return None, dict(self._cache[key])


def varlen_kwargs(doc_ids: Tensor) -> dict[str, Any]:
    """Cumulative sequence lengths of every document of every row, flattened over the batch.

    Args:
        doc_ids: ``[batch, seq]`` document index per token.

    Returns:
        The kwargs HF's flash path takes for variable-length attention: ``cu_seq_lens_q/k``
        (int32, ``[num_docs + 1]``) and ``max_length_q/k``.
    """
    b, s = doc_ids.shape
    row_offset = torch.arange(b, device=doc_ids.device)[:, None] * (s + 1)
    flat = (doc_ids + row_offset).flatten()
    _, lengths = torch.unique_consecutive(flat, return_counts=True)
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    max_len = int(lengths.max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max_len, "max_length_k": max_len}

"""Packing many short documents into long rows, without loss or attention across documents.

A packed row is described the way HF's ``DataCollatorWithFlattening`` describes it: ``position_ids``
restart at 0 at every document start, and that is the only document-boundary information the model
gets. Under Ulysses SP the attention mask is rebuilt from these gathered positions
(:mod:`lightning_ulysses.parallel.masks`), so packed documents never attend to each other on any backend.

Labels: HF shifts them inside the loss (position ``t`` predicts ``labels[t + 1]``), so the target of
the last token of document ``i`` would be the first token of document ``i + 1``. To keep the loss
inside documents, ``labels`` is ``-100`` on the **first** token of every document (which also
ignores the first token of the row, never a target anyway). Padding gets ``labels = -100``.

Padding forms its own pseudo-document (its positions restart at 0 too), so no real token can attend
to it even without an ``attention_mask`` (it comes last, and attention is causal and per document).
That keeps a padded packed row usable with flash attention under SP, which cannot express padding
*and* documents at once. Note that HF's non-SP models honour packed ``position_ids`` only when no
``attention_mask`` is passed and no KV cache is built (``use_cache=False``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

IGNORE_INDEX = -100

__all__ = ["IGNORE_INDEX", "PackedDataset", "PackingCollator", "pack_documents"]


def _as_list(tokens: Sequence[int] | Tensor) -> list[int]:
    if isinstance(tokens, Tensor):
        if tokens.dim() != 1:
            raise ValueError(f"a document must be a 1D token sequence, got shape {tuple(tokens.shape)}.")
        return tokens.tolist()
    return [int(t) for t in tokens]


class _RowBuilder:
    """Accumulates document pieces into one row: tokens, labels and restarting positions."""

    def __init__(self) -> None:
        self.input_ids: list[int] = []
        self.labels: list[int] = []
        self.position_ids: list[int] = []
        self.valid: list[int] = []

    def __len__(self) -> int:
        return len(self.input_ids)

    def add_document(self, tokens: Sequence[int], labels: Sequence[int] | None = None) -> None:
        """Append one document (a new one: positions restart, its first label is ignored)."""
        if not tokens:
            return
        labels = tokens if labels is None else labels
        self.input_ids.extend(tokens)
        self.labels.append(IGNORE_INDEX)
        self.labels.extend(labels[1:])
        self.position_ids.extend(range(len(tokens)))
        self.valid.extend([1] * len(tokens))

    def add_padding(self, count: int, pad_id: int) -> None:
        """Append ``count`` pad tokens as their own pseudo-document (positions restart, labels ignored)."""
        self.input_ids.extend([pad_id] * count)
        self.labels.extend([IGNORE_INDEX] * count)
        self.position_ids.extend(range(count))
        self.valid.extend([0] * count)

    def build(self, with_attention_mask: bool) -> dict[str, Tensor]:
        out = {
            "input_ids": torch.tensor(self.input_ids, dtype=torch.long),
            "labels": torch.tensor(self.labels, dtype=torch.long),
            "position_ids": torch.tensor(self.position_ids, dtype=torch.long),
        }
        if with_attention_mask:
            out["attention_mask"] = torch.tensor(self.valid, dtype=torch.long)
        return out


def pack_documents(
    docs: Iterable[Sequence[int] | Tensor],
    seq_len: int,
    *,
    drop_remainder: bool = False,
    pad_id: int = 0,
    return_attention_mask: bool = False,
) -> list[dict[str, Tensor]]:
    """Concatenate documents greedily into rows of exactly ``seq_len`` tokens.

    Documents are streamed in order into the current row; a document that does not fit in what is
    left of the row is cut there and continues at the start of the next row (so only the last row
    can need padding). Every piece of a cut document, and so every piece of a document longer than
    ``seq_len``, is its own document: its positions restart at 0 and its first label is ignored.
    Empty documents are skipped.

    Args:
        docs: token sequences (lists of ints or 1D tensors).
        seq_len: length of every returned row.
        drop_remainder: drop the last, incomplete row instead of padding it.
        pad_id: token id used for padding.
        return_attention_mask: give the padded last row an ``attention_mask`` (1 = real token).
            Off by default: padding is its own pseudo-document, so the mask is not needed, and a
            packed row *with* a mask is attended across documents by the non-SP transformers model
            (it detects packing only when no mask is given), so SP refuses it unless
            ``packed_documents="split"`` (see the README, "Packed rows").

    Returns:
        One dict per row, each tensor of shape ``[seq_len]`` (int64):

        * ``input_ids`` — the tokens, ``pad_id`` on padding;
        * ``labels`` — ``input_ids`` with ``-100`` on the first token of every document and on
          padding, so that after HF's shift (``t`` predicts ``labels[t + 1]``) no target crosses a
          document boundary;
        * ``position_ids`` — ``0, 1, ...`` restarting at every document start (and at the padding);
        * ``attention_mask`` — only on a padded last row when ``return_attention_mask``.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}.")
    rows: list[dict[str, Tensor]] = []
    row = _RowBuilder()
    for doc in docs:
        tokens = _as_list(doc)
        while tokens:
            take = seq_len - len(row)
            row.add_document(tokens[:take])
            tokens = tokens[take:]
            if len(row) == seq_len:
                rows.append(row.build(with_attention_mask=False))
                row = _RowBuilder()
    if len(row) and not drop_remainder:
        row.add_padding(seq_len - len(row), pad_id)
        rows.append(row.build(with_attention_mask=return_attention_mask))
    return rows


class PackedDataset(Dataset):
    """A map-style dataset of packed rows built once by :func:`pack_documents`.

    Each item is a dict of ``[seq_len]`` tensors (see :func:`pack_documents`). Only the padded last
    row can carry an ``attention_mask`` (when ``return_attention_mask=True``), so leave it off
    (the default) or pass ``drop_remainder=True`` to batch rows with PyTorch's default collate.

    Args:
        docs: token sequences.
        seq_len: row length.
        drop_remainder / pad_id / return_attention_mask: as in :func:`pack_documents`.
    """

    def __init__(
        self,
        docs: Iterable[Sequence[int] | Tensor],
        seq_len: int,
        *,
        drop_remainder: bool = False,
        pad_id: int = 0,
        return_attention_mask: bool = False,
    ) -> None:
        self.seq_len = seq_len
        self.rows = pack_documents(
            docs, seq_len, drop_remainder=drop_remainder, pad_id=pad_id, return_attention_mask=return_attention_mask
        )

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return dict(self.rows[index])


class PackingCollator:
    """``collate_fn`` that packs a list of variable-length samples into one row ``[1, total_len]``.

    Like HF's ``DataCollatorWithFlattening`` (one row, positions restarting per sample, the first
    label of each sample ignored), so no loss and — under Ulysses SP, or HF without SP with
    ``use_cache=False`` — no attention crosses samples. Use it with ``batch_size`` = the number of
    samples to pack per step, and ``pad_to_multiple_of=sp`` so that no SP padding is added.

    Args:
        pad_to_multiple_of: pad the row to a multiple of this (e.g. ``sp``, or 128 for kernels).
        pad_id: token id used for padding.
        return_attention_mask: add ``attention_mask [1, total_len]`` when the row was padded. The
            padding is its own pseudo-document, so this is optional; it is off by default because
            flash attention under SP cannot combine padding with packed documents, and HF without SP
            ignores packed ``position_ids`` whenever a mask is passed.

    Each sample is a mapping with ``input_ids`` (list of ints or 1D tensor) and optionally ``labels``
    of the same length (used instead of ``input_ids`` as targets), or a bare token sequence.

    Returns (from ``__call__``): ``input_ids``, ``labels`` (``-100`` on the first token of every
    sample and on padding) and ``position_ids``, each ``[1, total_len]`` int64, plus
    ``attention_mask`` as described above.
    """

    def __init__(
        self, pad_to_multiple_of: int | None = None, pad_id: int = 0, return_attention_mask: bool = False
    ) -> None:
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}.")
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pad_id = pad_id
        self.return_attention_mask = return_attention_mask

    def __call__(self, samples: Sequence[Mapping[str, Any] | Sequence[int] | Tensor]) -> dict[str, Tensor]:
        row = _RowBuilder()
        for sample in samples:
            if isinstance(sample, Mapping):
                tokens = _as_list(sample["input_ids"])
                labels = sample.get("labels")
                labels = None if labels is None else _as_list(labels)
                if labels is not None and len(labels) != len(tokens):
                    raise ValueError(f"sample labels have length {len(labels)} but input_ids {len(tokens)}.")
            else:
                tokens, labels = _as_list(sample), None
            row.add_document(tokens, labels)
        if not len(row):
            raise ValueError("PackingCollator got no tokens to pack.")
        pad = (-len(row)) % self.pad_to_multiple_of if self.pad_to_multiple_of else 0
        if pad:
            row.add_padding(pad, self.pad_id)
        out = row.build(with_attention_mask=bool(pad) and self.return_attention_mask)
        return {key: value.unsqueeze(0) for key, value in out.items()}

"""Sequence sharding of batches (README, "Using it": what the strategy does to each batch).

Every rank of an SP group reads the same full-length sample; :func:`shard_batch` then prepares it
on the full sequence and keeps this rank's chunk:

1. ``shift_labels = labels[:, 1:]`` padded with -100 (so no target is lost at a chunk edge);
2. ``position_ids`` are kept if given; otherwise the model's handle derives the global ones (as the
   model itself would: ``arange``, or from the padding mask for models that do so);
3. pad the sequence to a multiple of ``sp`` (labels -100, positions continuing). Rows without
   ``position_ids`` get a padding mask for it (bidirectional encoders would otherwise attend to it);
   packed rows (``position_ids`` given) get none: the padding follows every real token, so causal
   attention never sees it, and packed rows stay valid for flash;
4. keep chunk ``sp_rank``.

Targets predicted *from* a padding position (with left padding: the first real token) are
ignored: such a query has no real token to attend to, and its value depends on the backend.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..losses.sp_loss import shift_labels_full

IGNORE_INDEX = -100
SEQUENCE_KEYS = ("input_ids", "labels", "shift_labels", "attention_mask", "position_ids", "inputs_embeds")


def _pad_seq(x: Tensor, pad: int, value: float | int) -> Tensor:
    if pad == 0:
        return x
    # F.pad pads from the last dim backwards; the sequence is dim 1.
    spec = [0, 0] * (x.dim() - 2) + [0, pad]
    return F.pad(x, spec, value=value)


def shard_batch(batch: Mapping[str, Any], sp_rank: int, sp_size: int) -> dict[str, Any]:
    """Prepare a full-sequence batch and return SP rank ``sp_rank``'s contiguous chunk.

    Args:
        batch: ``input_ids [b, seq]`` (or ``inputs_embeds [b, seq, h]``), optionally ``labels``,
            ``shift_labels``, ``attention_mask`` and ``position_ids`` (all ``[b, seq]``). Other entries
            pass through unchanged.
        sp_rank: this rank's index in its SP group.
        sp_size: ``sp``.

    Returns:
        The same keys with every sequence tensor cut to ``[b, ceil(seq/sp)]`` (chunk ``sp_rank``
        of the padded sequence), plus ``position_ids`` and, when labels are present,
        ``shift_labels`` (shifted on the full sequence). ``labels`` is kept (its chunk) so HF
        computes the loss.
    """
    out = dict(batch)
    ref = out.get("input_ids")
    if ref is None:
        ref = out.get("inputs_embeds")
    if ref is None:
        raise ValueError("shard_batch needs 'input_ids' or 'inputs_embeds' in the batch.")
    b, seq = ref.shape[:2]
    if out.get("labels") is not None and out.get("shift_labels") is None:
        out["shift_labels"] = shift_labels_full(out["labels"], IGNORE_INDEX)
    if out.get("shift_labels") is not None and out.get("attention_mask") is not None:
        out["shift_labels"] = out["shift_labels"].masked_fill(out["attention_mask"] == 0, IGNORE_INDEX)
    pad = (-seq) % sp_size
    if out.get("position_ids") is not None:
        out["position_ids"] = out["position_ids"].expand(b, seq)
    if pad and out.get("position_ids") is None and out.get("attention_mask") is None:
        # Bidirectional models would attend to the appended padding; a mask keeps every model exact.
        out["attention_mask"] = torch.ones(b, seq, dtype=torch.long, device=ref.device)
    if pad and out.get("position_ids") is not None:
        last = out["position_ids"][:, -1:]
        extra = last + torch.arange(1, pad + 1, device=ref.device)
        out["position_ids"] = torch.cat([out["position_ids"], extra], dim=1)
    chunk = (seq + pad) // sp_size
    lo = sp_rank * chunk
    fill = {"labels": IGNORE_INDEX, "shift_labels": IGNORE_INDEX, "attention_mask": 0, "input_ids": 0}
    for key in SEQUENCE_KEYS:
        value = out.get(key)
        if not isinstance(value, Tensor) or value.dim() < 2 or value.shape[1] not in (seq, seq + pad):
            continue
        if value.shape[1] == seq:
            value = _pad_seq(value, pad, fill.get(key, 0))
        # contiguous: models .view() their labels and ids, and a slice of a [b > 1, seq] row is not
        out[key] = value[:, lo : lo + chunk].contiguous()
    return out


FINGERPRINT_KEY = "_ulysses_fingerprint"


def _digest(t: Tensor) -> int:
    """A signed 63-bit digest of a tensor's dtype, shape and every byte of its values (never 0)."""
    t = t.detach().to("cpu").contiguous()
    h = hashlib.blake2b(f"{t.dtype}{tuple(t.shape)}".encode(), digest_size=8)
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest(), "little") % (2**63 - 1) + 1


def batch_fingerprint(batch: Mapping[str, Any]) -> Tensor:
    """One int64 digest per per-token key the collate shards (:data:`SEQUENCE_KEYS`; 0 when absent).

    Computed on the full batch, before sharding. SP peers compare fingerprints before the first
    collective of a step: if a sampler or an iterable dataset handed them different samples — or
    the same tokens with different labels, masks or positions — Ulysses would stitch chunks of
    unrelated sequences (or label sets) together and train on them without any error. Every byte
    of every such tensor counts; peers disagree unless the tensors are identical.
    """
    return torch.tensor([_digest(v) if isinstance(v, Tensor) else 0 for v in (batch.get(k) for k in SEQUENCE_KEYS)],
                        dtype=torch.long)


def fingerprint_mismatch(fingerprints: Tensor) -> list[str]:
    """The :data:`SEQUENCE_KEYS` on which rows of ``fingerprints [peers, len(SEQUENCE_KEYS)]`` disagree."""
    differs = (fingerprints != fingerprints[:1]).any(0).tolist()
    return [key for key, bad in zip(SEQUENCE_KEYS, differs) if bad]


class ShardingCollate:
    """Wraps a DataLoader's ``collate_fn``: collate full samples, then keep this rank's chunk.

    Runs inside DataLoader workers, so sharding costs the training loop nothing. The batch must be
    a mapping (``input_ids``, ``labels``, ...); see :func:`shard_batch` for what is done to it.

    Args:
        collate_fn: the DataLoader's original collate function.
        sp_rank: this rank's index in its SP group.
        sp_size: ``sp``.
        fingerprint: add :func:`batch_fingerprint` of the full batch under ``FINGERPRINT_KEY``.
    """

    def __init__(self, collate_fn: Any, sp_rank: int, sp_size: int, fingerprint: bool = True) -> None:
        self.collate_fn = collate_fn
        self.sp_rank = sp_rank
        self.sp_size = sp_size
        self.fingerprint = fingerprint

    def __call__(self, samples: Any) -> dict[str, Any]:
        batch = self.collate_fn(samples)
        if not isinstance(batch, Mapping):
            raise TypeError(
                f"UlyssesStrategy shards dict batches (input_ids, labels, attention_mask, position_ids); the "
                f"dataloader produced {type(batch).__name__}. Return a dict from your dataset or collate_fn."
            )
        out = shard_batch(batch, self.sp_rank, self.sp_size)
        if self.fingerprint:
            out[FINGERPRINT_KEY] = batch_fingerprint(batch)
        return out

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
4. keep chunk ``sp_rank`` of every sequence-indexed tensor, on its sequence axis (``[b, s]`` ids,
   masks, labels, ``token_type_ids``; mrope's ``[3, b, s]`` positions; ``[b, s, h]`` embeddings);
   images and other inputs without a sequence axis go whole to every rank, and a tensor whose
   axes cannot be told apart is refused, naming it (declare it with ``batch_axes``).

Targets predicted *from* a padding position (with left padding: the first real token) are
ignored: such a query has no real token to attend to, and its value depends on the backend.
"""

from __future__ import annotations

import hashlib
import sys
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..losses.sp_loss import shift_labels_full

IGNORE_INDEX = -100
# Per-token inputs the collate knows, with their sequence axis (README, "Using it": a tensor is
# sequence-indexed when one of its axes is the row length). ``position_ids`` may be ``[b, s]`` or
# mrope's ``[3 | 4, b, s]``: its last axis is the sequence.
SEQUENCE_AXES: dict[str, int] = {
    "input_ids": 1, "labels": 1, "shift_labels": 1, "attention_mask": 1, "position_ids": -1,
    "inputs_embeds": 1, "token_type_ids": 1, "mm_token_type_ids": 1, "seq_idx": 1,
}
SEQUENCE_KEYS = tuple(SEQUENCE_AXES)
# Packed-row metadata of HF's ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``: it
# describes the whole row, so no chunk can use it. It is turned into (or checked against) the
# per-document ``position_ids`` the Ulysses attention rebuilds the same document mask from.
PACKED_ROW_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
# Inputs with no sequence axis, passed whole to every SP rank: images and videos and their layout.
_WHOLE_PREFIXES = ("pixel_", "image_", "video_", "vision_", "audio_", "input_features")
_WHOLE_SUFFIXES = ("_grid_thw", "_sizes", "_per_grid_ts")


class SPLabelsWarning(UserWarning):
    """User code read ``labels`` from a batch sharded over the SP group (see :class:`ShardedBatch`)."""


_LABELS_MESSAGE = (
    "batch['labels'] under sequence parallelism is this rank's chunk [batch, seq/sp] of the labels. Passing it "
    "to the model (labels=...) is exact, but shifting it here (labels[:, 1:], e.g. for a torchmetrics metric or "
    "a loss of your own) silently drops the target of the last position of every chunk. Use "
    "batch['shift_labels'] (this rank's targets, shifted on the full sequence) or "
    "lightning_ulysses.sp_shift_labels(batch). Shown once per line of code; silence it with "
    "warnings.filterwarnings('ignore', category=lightning_ulysses.SPLabelsWarning)."
)


def _warn_if_user_reads_labels(key: Any) -> None:
    if key != "labels":
        return
    # frame 0: this function, 1: the ShardedBatch method, 2: its caller
    caller = sys._getframe(2).f_globals.get("__name__", "")
    if caller == "lightning_ulysses" or caller.startswith("lightning_ulysses."):
        return  # the strategies, the handle and sp_shift_labels read labels on purpose
    warnings.warn(_LABELS_MESSAGE, SPLabelsWarning, stacklevel=3)


class ShardedBatch(dict):
    """This SP rank's chunk of a batch: a plain ``dict`` of ``[b, seq/sp]`` tensors (see :func:`shard_batch`),
    except that reading ``labels`` (``batch["labels"]``, ``.get``, ``.pop``) from code outside
    lightning_ulysses warns (:class:`SPLabelsWarning`, once per line of code with Python's default
    filter): those are local labels, and a shift of them loses a target at every chunk edge.

    ``model(**batch)``, ``batch.items()``, iteration and copies do not warn (``**`` unpacking of a dict
    subclass reads its storage directly), nor does any ``lightning_ulysses`` code (the caller's module
    is checked, one frame lookup, only for the ``labels`` key).
    """

    __slots__ = ()

    def __getitem__(self, key: Any) -> Any:
        _warn_if_user_reads_labels(key)
        return super().__getitem__(key)

    def get(self, key: Any, default: Any = None) -> Any:
        _warn_if_user_reads_labels(key)
        return super().get(key, default)

    def pop(self, key: Any, *default: Any) -> Any:
        _warn_if_user_reads_labels(key)
        return super().pop(key, *default)

    def copy(self) -> ShardedBatch:
        return ShardedBatch(self)


def _is_whole_input(key: str) -> bool:
    return key.startswith(_WHOLE_PREFIXES) or key.endswith(_WHOLE_SUFFIXES) or key.startswith("_")


def _pad_seq(x: Tensor, pad: int, value: float | int, axis: int = 1) -> Tensor:
    if pad == 0:
        return x
    axis %= x.dim()
    # F.pad pads from the last dim backwards.
    spec = [0, 0] * (x.dim() - 1 - axis) + [0, pad]
    return F.pad(x, spec, value=value)


def _positions_from_cu_seq_lens(cu: Tensor, seq: int) -> Tensor:
    """``[1, seq]`` positions restarting at every document start of ``cu_seq_lens`` (``[docs + 1]``)."""
    cu = cu.long().flatten()
    lengths = (cu[1:] - cu[:-1]).tolist()
    if int(cu[-1]) != seq or int(cu[0]) != 0 or min(lengths, default=1) < 0:
        raise ValueError(f"cu_seq_lens {cu.tolist()} does not describe a row of {seq} tokens.")
    return torch.cat([torch.arange(n) for n in lengths]).to(cu.device)[None]


def _packed_row_positions(out: dict[str, Any], b: int, seq: int) -> None:
    """Replace HF's flash packing metadata by the ``position_ids`` it implies (or check they agree)."""
    present = [k for k in PACKED_ROW_KEYS if k in out]
    if not present:
        return
    cu = out.get("cu_seq_lens_q", out.get("cu_seq_lens_k"))
    for key in present:
        out.pop(key)
    if cu is None:
        return
    if b != 1:
        raise ValueError(f"cu_seq_lens_* describe one packed row, but the batch has {b} rows.")
    implied = _positions_from_cu_seq_lens(cu, seq)
    given = out.get("position_ids")
    if given is None:
        out["position_ids"] = implied
    elif not torch.equal(given.reshape(-1, seq)[-1:].to(implied), implied):
        raise ValueError(
            "cu_seq_lens_* and position_ids describe different documents in the packed row; pass one of them."
        )


def _sequence_axis(key: str, value: Any, seq: int, axes: Mapping[str, int | None]) -> int | None:
    """The axis of ``value`` that indexes the row's tokens, ``None`` for an input passed whole."""
    if key in axes:
        return axes[key]
    if key in SEQUENCE_AXES:
        axis = SEQUENCE_AXES[key]
        if value.dim() < 2 or value.shape[axis] != seq:
            raise ValueError(
                f"batch[{key!r}] has shape {tuple(value.shape)}; its sequence axis ({axis}) should be the row "
                f"length {seq} (as input_ids)."
            )
        return axis
    if _is_whole_input(key) or value.dim() == 0 or seq not in value.shape:
        return None
    raise ValueError(
        f"batch[{key!r}] (shape {tuple(value.shape)}) has an axis of the row length {seq}, so it may be a per-token "
        "input that each SP rank must cut to its chunk, or an input every rank needs whole; lightning_ulysses does "
        f"not guess. Declare it: batch_axes={{{key!r}: <its sequence axis>}} to shard it, or {{{key!r}: None}} to "
        "pass it whole (an argument of the Ulysses strategies and of shard_batch)."
    )


def shard_batch(batch: Mapping[str, Any], sp_rank: int, sp_size: int,
                batch_axes: Mapping[str, int | None] | None = None) -> dict[str, Any]:
    """Prepare a full-sequence batch and return SP rank ``sp_rank``'s contiguous chunk.

    Args:
        batch: ``input_ids [b, seq]`` (or ``inputs_embeds [b, seq, h]``), optionally ``labels``,
            ``shift_labels``, ``attention_mask``, ``token_type_ids`` (all ``[b, seq]``) and
            ``position_ids`` (``[b, seq]``, ``[1, seq]`` or mrope's ``[3 | 4, b, seq]``). HF's packing
            metadata (``cu_seq_lens_*``, ``max_length_*``) is replaced by the ``position_ids`` it
            implies. Tensors with no axis of the row length (images: ``pixel_values``,
            ``image_grid_thw``, ...) and non-tensors pass through whole; any other tensor with an
            axis of the row length must be declared in ``batch_axes``.
        sp_rank: this rank's index in its SP group.
        sp_size: ``sp``.
        batch_axes: ``{key: sequence axis}`` for per-token inputs the collate does not know, or
            ``{key: None}`` for inputs to pass whole.

    Returns:
        The same keys with every sequence-indexed tensor cut on its sequence axis to
        ``ceil(seq/sp)`` tokens (chunk ``sp_rank`` of the sequence padded to a multiple of ``sp``):
        ``[b, ceil(seq/sp)]``, ``[3, b, ceil(seq/sp)]``, ``[b, ceil(seq/sp), h]``; the padding is
        ``-100`` in labels, 0 in ``input_ids`` and ``attention_mask``, and continues the positions.
        When labels are present, ``shift_labels`` (shifted on the full sequence, ``-100`` where the
        predicting position is padding: ``attention_mask == 0``) is added; ``labels`` is kept (its
        chunk) so HF computes the loss. Rows without ``position_ids`` that needed padding get an
        ``attention_mask`` for it. ``position_ids`` are in the output only when given (or implied by
        ``cu_seq_lens_*``), as ``[b, ...]`` even when given ``[seq]`` or ``[1, seq]``; the model's
        handle derives global ones otherwise. For ``sp_size > 1`` the result is a :class:`ShardedBatch` (a
        ``dict`` that warns when user code reads ``labels``, this rank's chunk of them).

    Raises:
        ValueError: a tensor whose sequence axis cannot be told (naming the key and the fix), or
            packing metadata that contradicts ``position_ids``.
    """
    out = dict(batch)
    axes = dict(batch_axes or {})
    ref = out.get("input_ids")
    if ref is None:
        ref = out.get("inputs_embeds")
    if ref is None:
        raise ValueError("shard_batch needs 'input_ids' or 'inputs_embeds' in the batch.")
    b, seq = ref.shape[:2]
    _packed_row_positions(out, b, seq)
    if out.get("labels") is not None and out.get("shift_labels") is None:
        out["shift_labels"] = shift_labels_full(out["labels"], IGNORE_INDEX)
    if out.get("shift_labels") is not None and out.get("attention_mask") is not None:
        out["shift_labels"] = out["shift_labels"].masked_fill(out["attention_mask"] == 0, IGNORE_INDEX)
    pad = (-seq) % sp_size
    positions = out.get("position_ids")
    if positions is not None:
        positions = positions.reshape(1, seq) if positions.dim() == 1 else positions
        out["position_ids"] = positions.expand(*positions.shape[:-2], b, seq)
    if pad and positions is None and out.get("attention_mask") is None:
        # Bidirectional models would attend to the appended padding; a mask keeps every model exact.
        out["attention_mask"] = torch.ones(b, seq, dtype=torch.long, device=ref.device)
    if pad and positions is not None:
        last = out["position_ids"][..., -1:]
        out["position_ids"] = torch.cat([out["position_ids"], last + torch.arange(1, pad + 1, device=ref.device)], -1)
    chunk = (seq + pad) // sp_size
    lo = sp_rank * chunk
    fill = {"labels": IGNORE_INDEX, "shift_labels": IGNORE_INDEX, "attention_mask": 0, "input_ids": 0}
    for key, value in list(out.items()):
        if not isinstance(value, Tensor):
            continue
        padded = key == "position_ids"  # already padded above
        axis = _sequence_axis(key, value, seq + pad if padded else seq, axes)
        if axis is None:
            continue
        if not padded:
            value = _pad_seq(value, pad, fill.get(key, 0), axis)
        # contiguous: models .view() their labels and ids, and a slice of a [b > 1, seq] row is not
        out[key] = value.narrow(axis, lo, chunk).contiguous()
    return ShardedBatch(out) if sp_size > 1 else out


FINGERPRINT_KEY = "_ulysses_fingerprint"


def _digest(t: Tensor) -> int:
    """A signed 63-bit digest of a tensor's dtype, shape and every byte of its values (never 0)."""
    t = t.detach().to("cpu").contiguous()
    h = hashlib.blake2b(f"{t.dtype}{tuple(t.shape)}".encode(), digest_size=8)
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest(), "little") % (2**63 - 1) + 1


OTHER_INPUTS = "other inputs"
FINGERPRINT_FIELDS = (*SEQUENCE_KEYS, OTHER_INPUTS)


def _digest_others(batch: Mapping[str, Any]) -> int:
    """One digest over the names and bytes of every tensor not in :data:`SEQUENCE_KEYS` (0: none)."""
    others = sorted((k, v) for k, v in batch.items() if isinstance(v, Tensor) and k not in SEQUENCE_AXES
                    and k != FINGERPRINT_KEY)
    if not others:
        return 0
    h = hashlib.blake2b(digest_size=8)
    for key, value in others:
        h.update(key.encode())
        h.update(_digest(value).to_bytes(8, "little"))
    return int.from_bytes(h.digest(), "little") % (2**63 - 1) + 1


def batch_fingerprint(batch: Mapping[str, Any]) -> Tensor:
    """One int64 digest per :data:`FINGERPRINT_FIELDS` entry (0 when absent): each per-token key the
    collate shards, then one over every other tensor (images and their layout, declared keys).

    Computed on the full batch, before sharding. SP peers compare fingerprints before the first
    collective of a step: if a sampler or an iterable dataset handed them different samples — or
    the same tokens with different labels, masks, positions or images — Ulysses would stitch chunks
    of unrelated sequences (or label sets) together and train on them without any error. Every byte
    of every tensor counts; peers disagree unless the tensors are identical.
    """
    digests = [_digest(v) if isinstance(v, Tensor) else 0 for v in (batch.get(k) for k in SEQUENCE_KEYS)]
    return torch.tensor([*digests, _digest_others(batch)], dtype=torch.long)


def fingerprint_mismatch(fingerprints: Tensor) -> list[str]:
    """The :data:`FINGERPRINT_FIELDS` on which rows of ``fingerprints [peers, fields]`` disagree."""
    differs = (fingerprints != fingerprints[:1]).any(0).tolist()
    return [key for key, bad in zip(FINGERPRINT_FIELDS, differs) if bad]


def uneven_rows(samples: Any) -> tuple[str, list[int]] | None:
    """The first per-token key whose samples differ in length, with the lengths; ``None`` if none do."""
    if not isinstance(samples, (list, tuple)) or not samples or not all(isinstance(x, Mapping) for x in samples):
        return None
    for key, axis in SEQUENCE_AXES.items():
        values = [x.get(key) for x in samples]
        if any(v is None for v in values):
            continue
        # a sample is a batch row: its sequence axis is the batch's minus one (or the last for positions)
        lengths = [v.shape[axis - 1 if axis > 0 else axis] if isinstance(v, Tensor) and v.dim() else
                   len(v) if isinstance(v, (list, tuple)) else -1 for v in values]
        if -1 not in lengths and len(set(lengths)) > 1:
            return key, lengths
    return None


def ragged_batch_message(key: str, lengths: list[int]) -> str:
    shown = ", ".join(map(str, lengths[:8])) + (", ..." if len(lengths) > 8 else "")
    return (
        f"the rows of this batch have different lengths ({key}: {shown} tokens), so they cannot be stacked into "
        "one [batch, seq] tensor to shard over the SP group. The SP peers of this rank fail at the same batch; "
        "ranks whose batch stacked report a lost connection (gloo: 'Connection closed by peer'): this is the "
        "cause. Pad the rows to one length with a padding collator (transformers' DataCollatorForSeq2Seq, or "
        "DataCollatorForLanguageModeling(mlm=False): labels padded with -100 and an attention_mask), or pack "
        "them into one row (lightning_ulysses.pack_documents / PackingCollator / PackedDataset, or transformers' "
        "DataCollatorWithFlattening), or use batch_size=1."
    )


class ShardingCollate:
    """Wraps a DataLoader's ``collate_fn``: collate full samples, then keep this rank's chunk.

    Runs inside DataLoader workers, so sharding costs the training loop nothing. The batch must be
    a mapping (``input_ids``, ``labels``, ...); see :func:`shard_batch` for what is done to it.

    Args:
        collate_fn: the DataLoader's original collate function.
        sp_rank: this rank's index in its SP group.
        sp_size: ``sp``.
        fingerprint: add :func:`batch_fingerprint` of the full batch under ``FINGERPRINT_KEY``.
        batch_axes: see :func:`shard_batch`.
    """

    def __init__(self, collate_fn: Any, sp_rank: int, sp_size: int, fingerprint: bool = True,
                 batch_axes: Mapping[str, int | None] | None = None) -> None:
        self.collate_fn = collate_fn
        self.sp_rank = sp_rank
        self.sp_size = sp_size
        self.fingerprint = fingerprint
        self.batch_axes = dict(batch_axes or {})

    def __call__(self, samples: Any) -> dict[str, Any]:
        try:
            batch = self.collate_fn(samples)
        except RuntimeError as error:  # torch.stack of unequal sizes, in default_collate or a user's collate
            uneven = uneven_rows(samples)
            if uneven is None:
                raise
            raise ValueError(ragged_batch_message(*uneven)) from error
        if not isinstance(batch, Mapping):
            raise TypeError(
                f"UlyssesStrategy shards dict batches (input_ids, labels, attention_mask, position_ids); the "
                f"dataloader produced {type(batch).__name__}. Return a dict from your dataset or collate_fn."
            )
        out = shard_batch(batch, self.sp_rank, self.sp_size, self.batch_axes)
        if self.fingerprint:
            out[FINGERPRINT_KEY] = batch_fingerprint(batch)
        return out

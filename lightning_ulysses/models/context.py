"""The per-forward SP context: what every layer's token mixer and the loss share in one forward.

Built once per forward by :class:`~lightning_ulysses.models.apply.UlyssesHandle` and handed to attention,
non-attention mixers and the loss through the model's ``**kwargs`` under :data:`CONTEXT_KWARG`
(so activation-checkpoint recomputation sees the same object).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor
from torch.distributed import ProcessGroup

if TYPE_CHECKING:
    from ..parallel.masks import SequenceMetadata

CONTEXT_KWARG = "ulysses_context"


class ForwardContext:
    """Per-forward state shared by every layer's attention and by the loss.

    A plain class on purpose: wrappers that walk forward kwargs (FSDP2's mixed-precision input
    cast, for one) rebuild dataclasses and containers, and the layers must all see this object.

    Attributes:
        group: the SP process group all collectives of this forward run on.
        sp_rank: this rank's index in ``group`` (= its sequence chunk).
        sp_size: ``sp``.
        local_len: ``seq / sp`` tokens held by this rank.
        metadata: full-sequence positions, padding and documents.
        num_valid: labels that count toward the loss over the whole sequence (all SP ranks).
        gathered: per-token tensors of this forward already gathered over ``group``
            (:func:`~lightning_ulysses.models.whole_sequence.gathered`), by id.
        ulysses_group / ulysses_rank: the ranks that exchange heads (``group`` itself without a ring)
            and this rank's index there (``sp_rank % ulysses``).
        ring_group / ring_rank / ring_size: the ranks that pass key/value blocks around (``None``,
            0 and 1 without a ring); ring rank ``sp_rank // ulysses``.
        ring_layout: ``"zigzag"``: causal layers re-lay their ring blocks out balanced
            (:mod:`lightning_ulysses.parallel.zigzag`) around ring attention; ``"contiguous"``: not.
    """

    __slots__ = ("group", "sp_rank", "sp_size", "local_len", "metadata", "num_valid", "attention_calls",
                 "loss_calls", "gathered", "ulysses_group", "ulysses_rank", "ring_group", "ring_rank", "ring_size",
                 "ring_layout")

    def __init__(self, group: ProcessGroup, sp_rank: int, sp_size: int, local_len: int,
                 metadata: SequenceMetadata, num_valid: Tensor | int,
                 ulysses_group: ProcessGroup | None = None, ring_group: ProcessGroup | None = None,
                 ring_size: int = 1, ring_layout: str = "zigzag") -> None:
        self.ring_layout = ring_layout
        self.ulysses_group = ulysses_group if ulysses_group is not None else group
        self.ring_group = ring_group
        self.ring_size = ring_size
        ulysses = sp_size // ring_size
        self.ulysses_rank = sp_rank % ulysses
        self.ring_rank = sp_rank // ulysses
        self.group = group
        self.sp_rank = sp_rank
        self.sp_size = sp_size
        self.local_len = local_len
        self.metadata = metadata
        self.num_valid = num_valid
        self.attention_calls = 0
        self.loss_calls = 0
        self.gathered: dict[int, tuple] = {}

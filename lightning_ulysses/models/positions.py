"""Global position ids for a sharded sequence, derived as the model itself would derive them.

A model that is not given ``position_ids`` derives them from what it sees; under SP each rank sees a
chunk, so the handle derives them once per forward on the gathered full sequence and hands every
rank its slice. How a model derives them is part of its structure (:mod:`.coverage`):

* ``arange``: ``0 .. seq-1`` (most decoders: RoPE from the cache position);
* ``from_mask``: ``cumsum(mask) * mask - 1`` over the padding mask (OPT-style learned positions,
  so a left-padded row starts at 0 at its first real token);
* ``from_input_ids``: ``cumsum(ids != pad) * (ids != pad) + padding_idx`` (RoBERTa-style).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .analysis import Positions


def derive_positions(kind: Positions, batch: int, seq: int, device: torch.device, mask: Tensor | None = None,
                     input_ids: Tensor | None = None, padding_idx: int | None = None) -> Tensor:
    """``[batch, seq]`` positions of the full sequence.

    Args:
        kind: the model's derivation rule.
        mask: the gathered ``[batch, seq]`` padding mask (1 = real token), if any.
        input_ids: the gathered ``[batch, seq]`` token ids (``from_input_ids``), if any.
        padding_idx: the embedding's padding index (``from_input_ids``).
    """
    arange = torch.arange(seq, device=device).expand(batch, seq)
    if kind == "from_mask" and mask is not None:
        mask = mask.long()
        return mask.cumsum(-1) * mask - 1
    if kind == "from_input_ids":
        pad = 0 if padding_idx is None else padding_idx
        if input_ids is None:  # inputs_embeds: every token counts as real
            return arange + pad + 1
        real = (input_ids != pad).long()
        return real.cumsum(-1) * real + pad
    return arange

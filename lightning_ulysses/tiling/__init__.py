"""Sequence tiling: per-token computations run tile by tile along the sequence to cap activation memory.

One module per job:

* :mod:`.shards` — tile bounds and a tile count agreed across ranks;
* :mod:`.compute` — the generic tiled autograd function (:func:`sequence_tiled_compute`);
* :mod:`.mlp` — tiled decoder MLPs (:func:`tile_mlps`, :class:`TiledMLP`);
* :mod:`.lm_loss` — the LM-head cross-entropy without full logits (:func:`tiled_causal_lm_loss_sum`);
* :mod:`.hf_loss` — that loss installed on a transformers causal LM (:func:`apply_tiled_loss`).

The maths (exact means, one gradient per parameter per step, upstream-gradient scaling) is in
docs/tiling.md.
"""

from .compute import SequenceTiledCompute, sequence_tiled_compute
from .hf_loss import DEFAULT_TILE_BYTES, TiledLossHandle, apply_tiled_loss, auto_shards
from .lm_loss import tiled_causal_lm_loss_sum
from .mlp import TiledMLP, TiledMLPHandle, tile_mlps
from .shards import agree_on_shards, tile_bounds

__all__ = [
    "DEFAULT_TILE_BYTES",
    "SequenceTiledCompute",
    "TiledLossHandle",
    "TiledMLP",
    "TiledMLPHandle",
    "agree_on_shards",
    "apply_tiled_loss",
    "auto_shards",
    "sequence_tiled_compute",
    "tile_bounds",
    "tile_mlps",
    "tiled_causal_lm_loss_sum",
]

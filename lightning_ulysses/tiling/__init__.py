"""Sequence tiling: per-token computations run tile by tile along the sequence to cap activation memory.

One module per job:

* :mod:`.shards` — tile bounds and a tile count agreed across ranks;
* :mod:`.compute` — the generic tiled autograd function (:func:`sequence_tiled_compute`);
* :mod:`.mlp` — tiled decoder MLPs (:func:`tile_mlps`, :class:`TiledMLP`).

The tiled LM loss built on it lives with the other losses (:mod:`lightning_ulysses.losses`).

The maths (exact means, one gradient per parameter per step, upstream-gradient scaling) is in
docs/tiling.md.
"""

from .compute import SequenceTiledCompute, sequence_tiled_compute
from .mlp import TiledMLP, TiledMLPHandle, tile_mlps
from .shards import agree_on_shards, tile_bounds

__all__ = [
    "SequenceTiledCompute",
    "TiledMLP",
    "TiledMLPHandle",
    "agree_on_shards",
    "sequence_tiled_compute",
    "tile_bounds",
    "tile_mlps",
]

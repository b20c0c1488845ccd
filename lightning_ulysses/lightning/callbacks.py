"""Lightning callbacks."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl

from ..models.apply import find_hf_models
from ..losses.tiled_hf_loss import DEFAULT_TILE_BYTES, TiledLossHandle, apply_tiled_loss
from ..tiling import TiledMLPHandle, tile_mlps


class TiledLossCallback(pl.Callback):
    """Compute the causal-LM training loss without materialising ``[batch, seq, vocab]`` logits.

    In ``setup`` every transformers ``PreTrainedModel`` of the LightningModule gets
    :func:`~lightning_ulysses.tiling.apply_tiled_loss` (and, with ``tile_mlp``, its MLPs are
    tiled along the sequence by :func:`~lightning_ulysses.tiling.tile_mlps`); ``teardown`` undoes
    both. ``out.loss`` keeps its meaning — under ``UlyssesStrategy``, the exact token mean of the
    whole sequence — and training outputs carry ``logits=None``. Eval and predict return logits
    unless ``tile_in_eval``. Works with and without the Ulysses strategies.

    Args:
        shards: loss tiles per sequence chunk, or ``"auto"`` (float32 logits of one tile fit in
            ``tile_bytes``).
        tile_bytes: memory budget of one tile's logits for ``"auto"``.
        tile_mlp: also tile every decoder MLP along the sequence.
        mlp_shards: MLP tiles, or ``"auto"`` (``ceil(seq / hidden)``, agreed across ranks).
        tile_in_eval: tile the loss in validation/test too.
    """

    def __init__(self, shards: int | Literal["auto"] = "auto", tile_bytes: int = DEFAULT_TILE_BYTES,
                 tile_mlp: bool = False, mlp_shards: int | Literal["auto"] = "auto",
                 tile_in_eval: bool = False) -> None:
        self.shards = shards
        self.tile_bytes = tile_bytes
        self.tile_mlp = tile_mlp
        self.mlp_shards = mlp_shards
        self.tile_in_eval = tile_in_eval
        self._loss_handles: list[TiledLossHandle] = []
        self._mlp_handles: list[TiledMLPHandle] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._loss_handles:
            return
        models = find_hf_models(pl_module)
        if not models:
            raise ValueError("TiledLossCallback found no transformers PreTrainedModel in the LightningModule.")
        for model in models:
            self._loss_handles.append(apply_tiled_loss(model, self.shards, self.tile_bytes, self.tile_in_eval))
            if self.tile_mlp:
                self._mlp_handles.append(tile_mlps(model, self.mlp_shards))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in [*self._loss_handles, *self._mlp_handles]:
            handle.remove()
        self._loss_handles, self._mlp_handles = [], []

    def state_dict(self) -> dict[str, Any]:
        return {}

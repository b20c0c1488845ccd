"""lightning-ulysses: Ulysses sequence parallelism for HuggingFace models in PyTorch Lightning.

The package is layered along the data path, one subpackage per layer (each says what it owns):
:mod:`.parallel` (mesh, collectives, attention), :mod:`.models` (what is done to a model),
:mod:`.losses` (exact objectives), :mod:`.tiling` (tiled compute) and :mod:`.lightning`
(strategies, callbacks, data); :mod:`.support` is the support-matrix engine. Commands:
``python -m lightning_ulysses.convert_checkpoint`` and ``python -m lightning_ulysses.check``.
"""

from .lightning.callbacks import TiledLossCallback
from .lightning.data import ShardedBatch, SPLabelsWarning, shard_batch
from .lightning.metrics import PositionalLoss, PositionalLossCallback
from .lightning.packing import PackedDataset, PackingCollator, pack_documents
from .lightning.strategies import UlyssesFabricStrategy, UlyssesFSDPFabricStrategy, UlyssesFSDPStrategy, UlyssesStrategy
from .lightning.throughput import UlyssesThroughputMonitor
from .losses.objectives import (current_sp_group, is_sp_reduced, sp_gather_tokens, sp_num_valid_tokens,
                                sp_sequence_sum, sp_shift_labels, sp_token_mean, token_logprobs)
from .losses.tiled_hf_loss import apply_tiled_loss
from .models.analysis import UnsupportedModelError
from .models.apply import UlyssesHandle, apply_ulysses
from .parallel.comm import gather_sequence, heads_from_sequence, sequence_from_heads, sum_over_group
from .tiling import SequenceTiledCompute, TiledMLP, sequence_tiled_compute, tile_mlps

__all__ = [
    "PackedDataset",
    "PackingCollator",
    "pack_documents",
    "PositionalLoss",
    "PositionalLossCallback",
    "SequenceTiledCompute",
    "TiledLossCallback",
    "TiledMLP",
    "apply_tiled_loss",
    "sequence_tiled_compute",
    "tile_mlps",
    "UlyssesHandle",
    "UnsupportedModelError",
    "UlyssesFabricStrategy",
    "UlyssesFSDPFabricStrategy",
    "UlyssesFSDPStrategy",
    "UlyssesStrategy",
    "UlyssesThroughputMonitor",
    "apply_ulysses",
    "gather_sequence",
    "heads_from_sequence",
    "sequence_from_heads",
    "shard_batch",
    "ShardedBatch",
    "SPLabelsWarning",
    "sum_over_group",
    "current_sp_group",
    "is_sp_reduced",
    "sp_gather_tokens",
    "sp_num_valid_tokens",
    "sp_sequence_sum",
    "sp_shift_labels",
    "sp_token_mean",
    "token_logprobs",
]
__version__ = "0.1.0"

"""lightning-ulysses: Ulysses sequence parallelism for HuggingFace models in PyTorch Lightning."""

from .callbacks import TiledLossCallback
from .comm import gather_sequence, heads_from_sequence, sequence_from_heads, sum_over_group
from .coverage import UnsupportedModelError
from .data import shard_batch
from .hf import UlyssesHandle, apply_ulysses
from .metrics import PositionalLoss, PositionalLossCallback
from .objectives import (current_sp_group, is_sp_reduced, sp_gather_tokens, sp_num_valid_tokens, sp_sequence_sum,
                         sp_shift_labels, sp_token_mean, token_logprobs)
from .packing import PackedDataset, PackingCollator, pack_documents
from .strategies import UlyssesFabricStrategy, UlyssesFSDPFabricStrategy, UlyssesFSDPStrategy, UlyssesStrategy
from .throughput import UlyssesThroughputMonitor
from .tiling import SequenceTiledCompute, TiledMLP, apply_tiled_loss, sequence_tiled_compute, tile_mlps

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

"""lightning-ulysses: Ulysses sequence parallelism for HuggingFace models in PyTorch Lightning."""

from .comm import gather_sequence, heads_from_sequence, sequence_from_heads, sum_over_group
from .data import shard_batch
from .hf import UlyssesHandle, apply_ulysses
from .strategies import UlyssesFSDPStrategy, UlyssesStrategy

__all__ = [
    "UlyssesHandle",
    "UlyssesFSDPStrategy",
    "UlyssesStrategy",
    "apply_ulysses",
    "gather_sequence",
    "heads_from_sequence",
    "sequence_from_heads",
    "shard_batch",
    "sum_over_group",
]
__version__ = "0.1.0"

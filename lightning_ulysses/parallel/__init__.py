"""The parallel layer: how ranks are arranged and what they exchange, independent of any model.

* :mod:`.mesh` — the DP × SP device mesh, its process groups and their ``ring × ulysses`` split;
* :mod:`.comm` — every collective (all-to-all sequence↔heads, gathers, SP sums), with autograd;
* :mod:`.attention` — the Ulysses attention: exchange, the model's own backend on the full
  sequence, exchange back; head layouts and the ``sp`` they allow;
* :mod:`.masks` — full-sequence metadata (positions, padding, documents) and the masks built from it;
* :mod:`.segments` — attention split into the segments that can interact (packed rows, windows);
* :mod:`.ring` — the exact ring-attention kernel (K/V blocks passed round a ring group, log-sum-exp
  merge, block pairs that cannot interact skipped) and its token layouts;
* :mod:`.uneven` — the differentiable all-gather of shares of different sizes (``vision_sp``);
* :mod:`.zigzag` — the ring blocks' causal-balanced layout, reached by one exchange on the ring group.
"""

from .ring import RingStats, contiguous_indices, record_ring_stats, ring_attention, zigzag_indices

__all__ = ["RingStats", "contiguous_indices", "record_ring_stats", "ring_attention", "zigzag_indices"]

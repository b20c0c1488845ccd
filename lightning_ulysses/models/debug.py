"""The debug mode ``debug_skip_attention``: which layer still attends, and the warning that says so.

With it every attention layer but the last skips its attention computation (the all-to-alls still
run), so a configuration's memory limit is found quickly: a skipped layer keeps what a linear-memory
kernel keeps for backward (q, k, v, output, softmax statistics), the kernels' transient memory is
still allocated by the last layer, and their O(s^2) time, which dominates long sequences, is gone.
The results are wrong; it is never on by default.
"""

from __future__ import annotations

import logging
import warnings

from torch import nn

log = logging.getLogger("lightning_ulysses")

WARNING = (
    "DEBUG MODE debug_skip_attention=True on {model}: attention is computed in layer {layer} only; every other "
    "attention layer returns a stand-in. Losses, gradients and outputs are WRONG. Use it only to find the "
    "memory limit of a configuration (e.g. benchmarks/bench_memory.py), never to train."
)


def debug_attend_layer(model: nn.Module) -> int:
    """The ``layer_idx`` of the model's last attention layer (the one that keeps attending), and warn.

    Attention modules are those whose class name contains ``Attention`` and that carry an integer
    ``layer_idx`` (transformers' convention); without any, the last decoder layer's index.
    """
    indices = [m.layer_idx for m in model.modules()
               if "Attention" in type(m).__name__ and isinstance(getattr(m, "layer_idx", None), int)]
    layer = max(indices) if indices else model.config.num_hidden_layers - 1
    message = WARNING.format(model=type(model).__name__, layer=layer)
    log.warning(message)
    warnings.warn(message, UserWarning, stacklevel=3)
    return layer

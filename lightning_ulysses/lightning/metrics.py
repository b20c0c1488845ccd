"""Long-context diagnostics: token loss and perplexity by position bucket, exact under SP.

Under SP each rank holds a disjoint chunk of the sequence with **global** position ids, and DP
ranks hold distinct samples, so summing per-bucket loss sums and token counts over all ranks (the
torchmetrics ``"sum"`` reduction over the default group) counts every token exactly once — the
same numbers a single device computes on the full sequences.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor

from ..models.apply import find_hf_models
from ..losses.sp_loss import shift_labels_full


class PositionalLoss(torchmetrics.Metric):
    """Mean token cross-entropy per position bucket (``compute() -> [num_buckets]``).

    Buckets split ``[0, max_len)`` evenly; positions ``>= max_len`` fall into the last bucket.
    With packed documents, positions restart per document, so buckets are in-document positions.

    Args:
        max_len: sequence length the buckets cover.
        num_buckets: number of equal-width buckets.
        ignore_index: label value that does not count.
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, max_len: int, num_buckets: int = 8, ignore_index: int = -100, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if max_len < num_buckets or num_buckets < 1:
            raise ValueError(f"need 1 <= num_buckets <= max_len, got num_buckets={num_buckets}, max_len={max_len}.")
        self.max_len = max_len
        self.num_buckets = num_buckets
        self.ignore_index = ignore_index
        self.add_state("loss_sum", torch.zeros(num_buckets, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(num_buckets, dtype=torch.float64), dist_reduce_fx="sum")

    def bucket_edges(self) -> list[tuple[int, int]]:
        """``[lo, hi)`` position range of every bucket."""
        edges = [b * self.max_len // self.num_buckets for b in range(self.num_buckets + 1)]
        return list(zip(edges[:-1], edges[1:]))

    def update(self, logits: Tensor, shift_labels: Tensor, position_ids: Tensor) -> None:
        """Add one (chunk of a) batch.

        Args:
            logits: ``[batch, seq_local, vocab]``.
            shift_labels: ``[batch, seq_local]`` targets, shifted on the full sequence.
            position_ids: ``[batch, seq_local]`` global positions.
        """
        ce = F.cross_entropy(logits.float().flatten(0, 1), shift_labels.flatten().to(logits.device),
                             ignore_index=self.ignore_index, reduction="none")
        valid = shift_labels.flatten().to(logits.device) != self.ignore_index
        pos = position_ids.expand_as(shift_labels).flatten().to(logits.device)
        bucket = (pos * self.num_buckets // self.max_len).clamp(0, self.num_buckets - 1)
        self.loss_sum.index_add_(0, bucket[valid], ce[valid].double())
        self.count.index_add_(0, bucket[valid], torch.ones_like(ce[valid], dtype=torch.float64))

    def compute(self) -> Tensor:
        return self.loss_sum / self.count.clamp_min(1)


class PositionalLossCallback(pl.Callback):
    """Log validation loss and perplexity by position bucket (``val_pos_loss/<lo>-<hi>``,
    ``val_pos_ppl/<lo>-<hi>``) at the end of every validation epoch.

    Reads the logits and the (sharded) batch of every HF model forward during validation through a
    forward hook, so the LightningModule needs no change. Works with and without the Ulysses
    strategies; needs the logits, so do not combine with ``TiledLossCallback(tile_in_eval=True)``.

    Args:
        max_len: sequence length the buckets cover (longer positions fall into the last bucket).
        num_buckets: number of equal-width position buckets.
        prefix: start of the logged names (``<prefix>_loss/<lo>-<hi>``, ``<prefix>_ppl/<lo>-<hi>``).
    """

    def __init__(self, max_len: int, num_buckets: int = 8, prefix: str = "val_pos") -> None:
        self.metric = PositionalLoss(max_len, num_buckets)
        self.prefix = prefix
        self._hooks: list[Any] = []
        self._active = False
        self._strategy: Any = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._strategy = trainer.strategy
        if not self._hooks:
            self._hooks = [m.register_forward_hook(self._observe, with_kwargs=True) for m in find_hf_models(pl_module)]

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _observe(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        if not self._active:
            return
        logits = getattr(output, "logits", None)
        ids = kwargs.get("input_ids", args[0] if args else None)
        if logits is None or ids is None:
            raise RuntimeError("PositionalLossCallback needs the model's logits and input_ids during validation.")
        shift = kwargs.get("shift_labels")
        if shift is None:
            labels = kwargs.get("labels")
            if labels is None:
                return
            shift = shift_labels_full(labels)
        positions = kwargs.get("position_ids")
        if positions is None:
            # Under SP this rank holds chunk sp_rank of the sequence: its global positions start there.
            sharded = getattr(self._strategy, "sequences_sharded", False)
            start = self._strategy.sp_rank * ids.shape[1] if sharded else 0
            positions = start + torch.arange(ids.shape[1], device=logits.device)[None]
        self.metric.to(logits.device).update(logits.detach(), shift, positions)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.metric.reset()
        self._active = True

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._active = False
        loss = self.metric.compute()  # synchronised over all ranks
        values = {}
        for (lo, hi), value in zip(self.metric.bucket_edges(), loss.tolist()):
            values[f"{self.prefix}_loss/{lo}-{hi}"] = value
            values[f"{self.prefix}_ppl/{lo}-{hi}"] = float(torch.tensor(value).exp())
        # Every rank already holds the global values, so averaging them over ranks changes nothing;
        # sync_dist=True tells Lightning so (without it, it warns at every epoch-level log).
        pl_module.log_dict(values, sync_dist=True)
        self.metric.reset()

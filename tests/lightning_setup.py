"""A plain LightningModule around a tiny HF causal LM, its data, and a DDP-equivalent reference."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from tests.models import VOCAB, tiny_model, tokens


class LM(pl.LightningModule):
    """What a user writes without SP: the model's own loss, logged with sync_dist."""

    def __init__(self, heads: int = 4, kv_heads: int = 2, lr: float = 0.1, momentum: float = 0.0,
                 config: Any = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = tiny_model("llama", heads, kv_heads) if config is None else _from_config(config)
        self.step_losses: list[float] = []

    def training_step(self, batch, batch_idx):
        out = self.model(**batch)
        self.log("train_loss", out.loss, sync_dist=True)
        self.step_losses.append(out.loss.item())
        return out.loss

    def validation_step(self, batch, batch_idx):
        out = self.model(**batch)
        self.log("val_loss", out.loss, sync_dist=True)

    def test_step(self, batch, batch_idx):
        out = self.model(**batch)
        self.log("test_loss", out.loss, sync_dist=True)

    def predict_step(self, batch, batch_idx):
        return self.model(**batch).logits

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)


def _from_config(config):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(config).float()


class Samples(Dataset):
    """Sequences of length ``seq`` with uneven valid labels unless ``all_valid``."""

    def __init__(self, n: int, seq: int, all_valid: bool = False, seed: int = 3) -> None:
        self.ids = tokens(n, seq, seed=seed)
        self.labels = self.ids.clone()
        if not all_valid:
            for i in range(n):
                self.labels[i, : (i * 7) % (seq - 2)] = -100  # sample 0 fully valid, others masked prefixes

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def loader(ds: Dataset, batch_size: int = 1) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=False)


def replica_order(n: int, dp: int, epoch: int) -> list[list[int]]:
    """Sample indices each DP replica sees in ``epoch``: Lightning's training DistributedSampler
    (shuffled with seed 0, identical on every rank)."""
    from torch.utils.data import DistributedSampler

    orders = []
    for g in range(dp):
        sampler = DistributedSampler(range(n), num_replicas=dp, rank=g, shuffle=True, seed=0)
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
    return orders


def reference_fit(lm: LM, ds: Dataset, steps: int, dp: int, accumulate: int = 1, per_group: int = 1,
                  snapshots: dict | None = None):
    """What plain DDP over ``dp`` replicas computes, in one process.

    Micro-batch ``m`` of replica ``g`` holds its next ``per_group`` samples in DistributedSampler
    order. The objective is the mean over replicas of each replica's HF loss (token mean of its
    batch), and accumulated micro-batches are averaged. Returns the per-micro-batch logged
    (replica-mean) losses.
    """
    opt = lm.configure_optimizers()
    logged = []
    per_epoch = len(ds) // (dp * per_group)
    micro = 0
    for step in range(steps):
        opt.zero_grad()
        for _ in range(accumulate):
            epoch, pos = divmod(micro, per_epoch)
            orders = replica_order(len(ds), dp, epoch)
            losses = []
            for g in range(dp):
                idx = orders[g][pos * per_group:(pos + 1) * per_group]
                batch = {k: torch.stack([ds[i][k] for i in idx]) for k in ("input_ids", "labels")}
                loss = lm.model(**batch).loss
                (loss / (dp * accumulate)).backward()
                losses.append(loss.item())
            micro += 1
            logged.append(sum(losses) / dp)
        opt.step()
        if snapshots is not None:
            snapshots[step + 1] = {k: v.clone() for k, v in lm.state_dict().items()}
    return logged


def reference_eval(lm: LM, ds: Dataset) -> float:
    with torch.no_grad():
        return sum(lm.model(**{k: v[None] for k, v in ds[i].items()}).loss.item() for i in range(len(ds))) / len(ds)


def trainer_kwargs(**extra) -> dict[str, Any]:
    kw = dict(accelerator="cpu", devices=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, num_sanity_val_steps=0)
    kw.update(extra)
    return kw


__all__ = ["LM", "Samples", "loader", "reference_fit", "reference_eval", "trainer_kwargs", "VOCAB"]

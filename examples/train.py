"""Train a causal LM with Ulysses sequence parallelism from a LightningCLI YAML config.

    pip install -e ".[cli]"   # LightningCLI needs jsonargparse (the library itself does not)
    python examples/train.py fit --config examples/configs/cpu_tiny.yaml

The default config needs no download: a small Llama built from a config, trained on a real local
text corpus (Python's own standard-library sources unless ``--data.paths`` names other files),
tokenised on the fly into bytes and packed into long sequences. Lightning's progress bar shows the
training loss (the last step's, and ``loss_avg``: the mean of the last 10 steps), the validation loss
and perplexity, and tokens/s (``train/items_per_sec`` of ``UlyssesThroughputMonitor``: every token of
the job, counted once although each SP rank holds ``seq/sp`` of a sequence).
"""

from __future__ import annotations

import glob
import os
import sysconfig
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader, Dataset
from torchmetrics.aggregation import RunningMean
from torchmetrics.text import Perplexity

import lightning_ulysses  # noqa: F401  (registers the "ulysses" strategy names)
from lightning_ulysses import sp_shift_labels

BOS, EOS, VOCAB = 256, 257, 258


def byte_tokens(text: str) -> list[int]:
    """Byte-level tokenizer: UTF-8 bytes are the ids 0..255; BOS/EOS frame every document."""
    return [BOS, *text.encode("utf-8", errors="replace"), EOS]


class PackedText(Dataset):
    """Text files concatenated (each framed by BOS/EOS) and cut into rows of ``seq_len`` tokens."""

    def __init__(self, paths: list[str], seq_len: int, max_rows: int | None = None) -> None:
        stream: list[int] = []
        need = None if max_rows is None else max_rows * seq_len
        for path in paths:
            with open(path, encoding="utf-8", errors="replace") as f:
                stream.extend(byte_tokens(f.read()))
            if need is not None and len(stream) >= need:
                break
        rows = len(stream) // seq_len if need is None else min(len(stream) // seq_len, max_rows)
        if rows == 0:
            raise ValueError(f"the corpus has {len(stream)} tokens, fewer than one sequence of {seq_len}.")
        self.data = torch.tensor(stream[: rows * seq_len], dtype=torch.long).view(rows, seq_len)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.data[i]
        return {"input_ids": ids, "labels": ids}


def batch_rows(batch: dict[str, torch.Tensor]) -> int:
    """Samples in a batch (``UlyssesThroughputMonitor``'s ``batch_size_fn``)."""
    return batch["input_ids"].shape[0]


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens this rank holds (``length_fn``: under SP its chunk; the monitor counts the job's tokens)."""
    return batch["input_ids"].numel()


def default_corpus() -> list[str]:
    """Python's standard-library sources: real text present on every machine with Python."""
    return sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))


class TextData(pl.LightningDataModule):
    """Long packed sequences from local text files.

    Args:
        paths: text files or glob patterns; default: Python's standard library sources.
        seq_len: tokens per training sequence (the full length; the strategy shards it).
        train_rows: sequences in the training split.
        val_rows: sequences in the validation split (at most a quarter of the corpus's sequences).
        batch_size: sequences per DP replica per step.
        num_workers: DataLoader worker processes (0 loads in the training process).
    """

    def __init__(self, paths: list[str] | None = None, seq_len: int = 2048, train_rows: int = 64,
                 val_rows: int = 8, batch_size: int = 1, num_workers: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        hp = self.hparams
        files = default_corpus() if not hp.paths else sorted(f for p in hp.paths for f in glob.glob(p))
        data = PackedText(files, hp.seq_len, hp.train_rows + hp.val_rows)
        n_val = min(hp.val_rows, len(data) // 4)
        self.train, self.val = torch.utils.data.random_split(
            data, [len(data) - n_val, n_val], generator=torch.Generator().manual_seed(0))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.hparams.batch_size, shuffle=True,
                          num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers)


class CausalLM(pl.LightningModule):
    """A HuggingFace causal LM built from a config (no download), trained on its own loss.

    Args:
        model_type: a transformers model type (``llama``, ``qwen2``, ``mistral``...).
        config: keyword arguments for that model's config (sizes, heads, rope...).
        attn_implementation: ``sdpa`` (CPU/GPU), ``flash_attention_2``, ``flex_attention``...
        optimizer: ``"adamw"`` or ``"sgd"`` (momentum 0.9; no optimizer state beyond one buffer).
        lr: peak learning rate, reached after the warm-up.
        weight_decay: decoupled (AdamW) or L2 (SGD) weight decay.
        warmup_steps: optimizer steps of linear learning-rate warm-up from ``lr / warmup_steps``.
        gradient_checkpointing: HF activation checkpointing of decoder layers.

    The optimizer is configured here only: the CLI adds no ``--optimizer``/``--lr_scheduler``
    (``auto_configure_optimizers=False``), so there is one way to set it.

    Under SP each rank's batch holds its chunk ``[b, seq/sp]`` of every sequence. ``out.loss`` is
    already the whole sequence's token mean; the perplexity metric is fed this rank's logits with
    ``sp_shift_labels(batch)`` (= ``batch["shift_labels"]``: targets shifted on the *full* sequence).
    Shifting ``batch["labels"]`` here would drop the target of every chunk's last position.
    """

    def __init__(self, model_type: str = "llama", config: dict[str, Any] | None = None,
                 attn_implementation: str = "sdpa", optimizer: Literal["adamw", "sgd"] = "adamw", lr: float = 1e-3,
                 weight_decay: float = 0.0, warmup_steps: int = 10, gradient_checkpointing: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model: torch.nn.Module | None = None
        # the loss is the same on every rank once averaged over DP, so no sync at compute
        self.loss_avg = RunningMean(window=10, sync_on_compute=False)
        # sums NLL and token counts over every rank at compute: each token counted once, as without SP
        self.val_ppl = Perplexity(ignore_index=-100)

    def configure_model(self) -> None:
        if self.model is not None:
            return
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.for_model(self.hparams.model_type, vocab_size=VOCAB, **(self.hparams.config or {}))
        self.model = AutoModelForCausalLM.from_config(cfg, attn_implementation=self.hparams.attn_implementation)
        if self.hparams.gradient_checkpointing:
            # newer transformers name it activation checkpointing (gradient_checkpointing_* warn as deprecated)
            if hasattr(self.model, "activation_checkpointing_enable"):
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.model(**batch)  # out.loss: the whole sequence's token mean, the same on every SP rank
        self.log("train_loss", out.loss, sync_dist=True, prog_bar=True)  # this step's, mean over DP replicas
        self.loss_avg.update(self.trainer.strategy.reduce(out.loss.detach(), reduce_op="mean"))
        self.log("loss_avg", self.loss_avg.compute(), prog_bar=True, logger=False)
        return out.loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self.model(**batch)
        self.log("val_loss", out.loss, sync_dist=True, prog_bar=True)
        self.val_ppl.update(out.logits, sp_shift_labels(batch))
        self.log("val_ppl", self.val_ppl, prog_bar=True)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=0.9, weight_decay=hp.weight_decay)
        else:
            opt = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        warm = max(1, self.hparams.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def main() -> None:
    # No config.yaml written into the working directory: logger-less runs would litter it.
    LightningCLI(CausalLM, TextData, save_config_callback=None, auto_configure_optimizers=False)


if __name__ == "__main__":
    main()

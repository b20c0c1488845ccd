"""Train a vision-language model with Ulysses sequence parallelism from a LightningCLI YAML config.

    python examples/train_vlm.py fit --config examples/configs/qwen2_vl_tiny.yaml

The default config needs no download: a tiny Qwen2-VL built from a config (vision tower of depth 1),
trained on long rows of real local text (Python's standard-library sources, byte-tokenised as in
``train.py``) into which synthetic images are inserted at random places — 0 to
``max_images`` per row, so some rows and batches have none. The vision tower runs replicated on every
SP rank on the whole images; the language model is sharded along the sequence (README,
"Vision-language models"). It prints loss and tokens/s.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train import BOS, EOS, VOCAB as TEXT_VOCAB, PackedText, default_corpus  # noqa: E402

# Qwen2-VL's special tokens, after the byte vocabulary of train.py
IMAGE, VIDEO, VISION_START, VISION_END = TEXT_VOCAB, TEXT_VOCAB + 1, TEXT_VOCAB + 2, TEXT_VOCAB + 3
VOCAB = TEXT_VOCAB + 4
# Qwen2-VL merges 2 x 2 patches into one token
MERGE = 2
PER_TOKEN = ("input_ids", "labels", "mm_token_type_ids")
IMAGE_KEYS = ("pixel_values", "image_grid_thw")

__all__ = ["ImageTextData", "VisionLanguageLM", "collate"]


class ImageText(Dataset):
    """Rows of ``seq_len`` text tokens with synthetic images placed at random: each image is
    ``VISION_START``, ``grid_h * grid_w / 4`` ``IMAGE`` placeholders, ``VISION_END``, and its patches
    ``[grid_h * grid_w, 3 * patch * patch]`` as Qwen2-VL's processor gives them (``temporal_patch_size``
    1), with its grid ``[1, grid_h, grid_w]``. Placeholders carry no label (-100)."""

    def __init__(self, text: PackedText, max_images: int, grid: tuple[int, int], patch: int, seed: int) -> None:
        self.text, self.max_images, self.grid, self.patch, self.seed = text, max_images, grid, patch, seed

    def __len__(self) -> int:
        return len(self.text)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        ids = self.text[i]["input_ids"].clone()
        h, w = self.grid
        tokens = h * w // (MERGE * MERGE)
        span = tokens + 2
        count = int(torch.randint(0, self.max_images + 1, (1,), generator=gen))
        count = min(count, len(ids) // (2 * span))
        # non-overlapping image spans: one per equal stretch of the row, at a random offset in it
        stretch = len(ids) // max(count, 1)
        for k in range(count):
            start = k * stretch + int(torch.randint(0, stretch - span + 1, (1,), generator=gen))
            ids[start], ids[start + 1:start + 1 + tokens], ids[start + 1 + tokens] = VISION_START, IMAGE, VISION_END
        labels = ids.masked_fill(ids == IMAGE, -100)
        item = {"input_ids": ids, "labels": labels, "mm_token_type_ids": (ids == IMAGE).long()}
        if count:
            # a smooth synthetic picture per image: a random colour ramp over its patches, plus noise
            ramp = torch.linspace(-1, 1, h * w)[:, None]
            colour = torch.randn(count, 1, 3 * self.patch * self.patch, generator=gen)
            noise = 0.1 * torch.randn(count, h * w, 3 * self.patch * self.patch, generator=gen)
            item["pixel_values"] = (ramp * colour + noise).reshape(count * h * w, -1)
            item["image_grid_thw"] = torch.tensor([[1, h, w]] * count)
        return item


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A processor's batch: per-token tensors stacked ``[b, seq]``, every row's images concatenated
    in row order (``pixel_values`` absent when no row has an image)."""
    batch = {k: torch.stack([s[k] for s in samples]) for k in PER_TOKEN}
    for key in IMAGE_KEYS:
        parts = [s[key] for s in samples if key in s]
        if parts:
            batch[key] = torch.cat(parts)
    return batch


class ImageTextData(pl.LightningDataModule):
    """Long text rows with synthetic images.

    Args:
        paths: text files; default: Python's standard library sources.
        seq_len: tokens per row (the full length; the strategy shards it).
        train_rows: rows in the training split.
        val_rows: rows in the validation split (0: no validation).
        max_images: images per row, drawn from 0..max_images.
        grid: ``[grid_h, grid_w]`` patches per image (multiples of 2; ``grid_h * grid_w / 4`` tokens).
        patch: the vision tower's ``patch_size`` (pixels per patch side).
        batch_size: rows per DP replica per step.
    """

    def __init__(self, paths: list[str] | None = None, seq_len: int = 2048, train_rows: int = 32, val_rows: int = 4,
                 max_images: int = 2, grid: tuple[int, int] = (8, 8), patch: int = 4, batch_size: int = 2) -> None:
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        hp = self.hparams
        text = PackedText(hp.paths or default_corpus(), hp.seq_len, hp.train_rows + hp.val_rows)
        n_val = min(hp.val_rows, len(text) // 4)
        train, val = torch.utils.data.random_split(text, [len(text) - n_val, n_val],
                                                   generator=torch.Generator().manual_seed(0))
        self.train = ImageText(train, hp.max_images, tuple(hp.grid), hp.patch, seed=0)
        self.val = ImageText(val, hp.max_images, tuple(hp.grid), hp.patch, seed=1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.hparams.batch_size, shuffle=True, collate_fn=collate)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=self.hparams.batch_size, collate_fn=collate)


class VisionLanguageLM(pl.LightningModule):
    """A Qwen2-VL built from a config (no download), trained on its own loss.

    Args:
        text_config: keyword arguments of its language model's config (sizes, heads, ``rope_parameters``
            with ``mrope_section``).
        vision_config: keyword arguments of its vision tower's config (``depth``, ``embed_dim``,
            ``patch_size``, ...).
        attn_implementation: ``sdpa`` (CPU/GPU), ``flash_attention_2``, ``flex_attention``...
        lr: AdamW learning rate.
    """

    def __init__(self, text_config: dict[str, Any] | None = None, vision_config: dict[str, Any] | None = None,
                 attn_implementation: str = "sdpa", lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model: torch.nn.Module | None = None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        hp = self.hparams
        config = Qwen2VLConfig(text_config={**(hp.text_config or {}), "vocab_size": VOCAB, "bos_token_id": BOS,
                                            "eos_token_id": EOS},
                               vision_config={"temporal_patch_size": 1, "spatial_merge_size": MERGE,
                                              **(hp.vision_config or {})},
                               image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START,
                               vision_end_token_id=VISION_END, bos_token_id=BOS, eos_token_id=EOS,
                               attn_implementation=hp.attn_implementation)
        self.model = Qwen2VLForConditionalGeneration(config)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.model(**batch)
        self.log("train_loss", out.loss, sync_dist=True, prog_bar=True, batch_size=len(batch["input_ids"]))
        return out.loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self.model(**batch)
        self.log("val_loss", out.loss, sync_dist=True, prog_bar=True, batch_size=len(batch["input_ids"]))

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def main() -> None:
    LightningCLI(VisionLanguageLM, ImageTextData, save_config_callback=None, auto_configure_optimizers=False)


if __name__ == "__main__":
    main()

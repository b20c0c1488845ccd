"""The support matrix's image batches (lightning_ulysses/support/images.py): placeholders sized by the
model's own tower, one image across the SP chunk border, and a forward the untouched model accepts."""

from __future__ import annotations

import pytest
import torch

from lightning_ulysses.support.configs import VOCAB, build_tiny
from lightning_ulysses.support.images import image_batch, image_config_kwargs, image_token, tokens_per_image


@pytest.mark.parametrize("arch, cls, form", [("qwen2_vl", "Qwen2VLForConditionalGeneration", "grid"),
                                             ("llava", "LlavaForConditionalGeneration", "square"),
                                             ("mistral3", "Mistral3ForConditionalGeneration", "square")])
def test_image_batch_fits_the_tiny_model(arch, cls, form):
    model = build_tiny(arch, cls, dtype=torch.float32, **image_config_kwargs(arch))
    assert image_token(model) < VOCAB
    n, _ = tokens_per_image(model)
    batch = image_batch(model, sp=2)
    ids = batch["input_ids"]
    seq = ids.shape[1]
    assert ((ids == image_token(model)).sum(-1) == n).all()
    assert ("image_grid_thw" in batch) == (form == "grid")
    where = (ids[1] == image_token(model)).nonzero().flatten()
    assert where.min() < seq // 2 <= where.max()  # row 1's image straddles the chunk border at sp=2
    loss = model(**batch).loss
    assert torch.isfinite(loss)

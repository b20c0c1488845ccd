"""Tiny vision-language models and batches with images, built identically in every process.

Shared by the VLM tests (apply_ulysses + shard_batch parity, Trainer / Fabric parity, Gemma 3's image
blocks): 1-2 language layers of hidden size 32, a vision tower of depth 1-2. Every
builder seeds nothing itself; call ``torch.manual_seed`` before it for identical weights.
"""

from __future__ import annotations

import torch

VOCAB = 97
SEQ = 32
IMG, VIDEO, START, END = 90, 91, 92, 93  # placeholder and delimiter token ids of the tiny configs
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}
QWEN_VISION = dict(patch_size=2, temporal_patch_size=1, spatial_merge_size=2, in_channels=3)
QWEN_TOKENS = dict(image_token_id=IMG, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END,
                   bos_token_id=1, eos_token_id=2, attn_implementation="sdpa")


def qwen2_vl():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    vision = dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, **QWEN_VISION)
    return Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config={**TEXT, "rope_parameters": MROPE},
                                                         vision_config=vision, **QWEN_TOKENS))


def qwen2_5_vl():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    # two blocks: one windowed, one full (fullatt_block_indexes), so the window reordering runs
    vision = dict(depth=2, hidden_size=16, out_hidden_size=32, intermediate_size=24, num_heads=2, window_size=8,
                  fullatt_block_indexes=[1], **QWEN_VISION)
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config={**TEXT, "rope_parameters": MROPE},
                                                               vision_config=vision, **QWEN_TOKENS))


def qwen3_vl():
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    # deepstack: the first block's features are added again after the language model's first layer,
    # at the image tokens, so they must be cut per chunk too
    vision = dict(depth=2, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=32,
                  num_position_embeddings=16, deepstack_visual_indexes=[0], **QWEN_VISION)
    text = {**TEXT, "head_dim": 8, "rope_parameters": {**MROPE, "mrope_interleaved": True}}
    return Qwen3VLForConditionalGeneration(Qwen3VLConfig(text_config=text, vision_config=vision, **QWEN_TOKENS))


def llava():
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    vision = {"model_type": "clip_vision_model", "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
              "num_attention_heads": 2, "image_size": 8, "patch_size": 2, "projection_dim": 16}
    return LlavaForConditionalGeneration(LlavaConfig(text_config={"model_type": "llama", **TEXT}, vision_config=vision,
                                                     image_token_id=IMG, image_seq_length=16,
                                                     attn_implementation="sdpa"))


def gemma3():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = {**TEXT, "head_dim": 8, "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]}
    vision = {"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 8, "patch_size": 2}
    model = Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                                        image_token_index=IMG, boi_token_index=START,
                                                        eoi_token_index=END, attn_implementation="sdpa"))
    # initialised to zero, the projection would pass no gradient to the vision tower: nothing to compare
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.2)
    return model


def _row_with_images(spans: list[tuple[int, int]], seed: int) -> torch.Tensor:
    """A row of text tokens with image placeholders at ``spans`` (start, length), delimited."""
    row = torch.randint(3, IMG - 1, (SEQ,), generator=torch.Generator().manual_seed(seed))
    for start, n in spans:
        row[start - 1], row[start:start + n], row[start + n] = START, IMG, END
    return row


def _qwen_images(spans_by_row, grids):
    """Qwen's flattened patches [patches, 3 * 1 * 2 * 2] and their [t, h, w] grids, in token order."""
    grid = torch.tensor(grids)
    patches = int(grid.prod(-1).sum())
    pixels = torch.randn(patches, 12, generator=torch.Generator().manual_seed(5))
    return {"pixel_values": pixels, "image_grid_thw": grid}


# Image spans (start, tokens) per row, chosen to straddle the chunk borders at sp=2 (16) and sp=4 (8, 24).
# Qwen: a grid [1, h, w] of patches gives h * w / 4 tokens (spatial merge 2): [1, 4, 4] -> 4, [1, 2, 4] -> 2,
# [1, 4, 6] -> 6; LLaVA: 16 tokens per 8x8 image (patch 2, CLS dropped); Gemma 3: 4 (pooled).
IMAGE_BATCHES = {
    "qwen": ([[(6, 4), (23, 2)], [(13, 6)]], [[1, 4, 4], [1, 2, 4], [1, 4, 6]]),
    "llava": ([[(5, 16)], [(12, 16)]], None),
    "gemma3": ([[(6, 4), (22, 4)], [(14, 4)]], None),
}


def vlm_batch(family: str, images: bool) -> dict[str, torch.Tensor]:
    if not images:
        # text only, the second row right-padded (the padding mask is gathered for the outer model)
        ids = torch.randint(3, IMG - 1, (2, SEQ), generator=torch.Generator().manual_seed(7))
        mask = torch.ones_like(ids)
        mask[1, 25:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if family == "qwen":
            batch["mm_token_type_ids"] = torch.zeros_like(ids)
        return batch
    spans, grids = IMAGE_BATCHES[family]
    ids = torch.stack([_row_with_images(s, seed=i) for i, s in enumerate(spans)])
    labels = ids.masked_fill(ids == IMG, -100)
    labels[0, :3] = -100  # a prompt
    batch = {"input_ids": ids, "labels": labels}
    n_images = sum(len(s) for s in spans)
    if family == "qwen":
        batch.update(_qwen_images(spans, grids), mm_token_type_ids=(ids == IMG).long())
    else:
        batch["pixel_values"] = torch.randn(n_images, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    return batch


# name: (builder, batch family)
MODELS = {"qwen2_vl": (qwen2_vl, "qwen"), "qwen2_5_vl": (qwen2_5_vl, "qwen"),
          "qwen3_vl": (qwen3_vl, "qwen"), "llava": (llava, "llava"),
          "gemma3": (gemma3, "gemma3")}

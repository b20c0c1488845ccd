"""Tiny vision-language models and batches with images, built identically in every process.

Shared by the VLM tests (apply_ulysses + shard_batch parity, Trainer / Fabric parity, Gemma 3's image
blocks): 1-2 language layers of hidden size 32, a vision tower of depth 1-2. Every
builder seeds nothing itself; call ``torch.manual_seed`` before it for identical weights.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lightning_ulysses import shard_batch
from tests.distributed import assert_close_rel, grad_ratio

VOCAB = 97
SEQ = 32
IMG, VIDEO, START, END = 90, 91, 92, 93  # placeholder and delimiter token ids of the tiny configs
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}
QWEN_VISION = dict(patch_size=2, temporal_patch_size=1, spatial_merge_size=2, in_channels=3)
QWEN_TOKENS = dict(image_token_id=IMG, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END,
                   bos_token_id=1, eos_token_id=2, attn_implementation="sdpa")


def seeded(build, *args):
    """``build(*args)`` in float32 from seed 0: every call gives the same weights (the untouched reference
    and the model to shard)."""
    torch.manual_seed(0)
    return build(*args).float()


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


def paligemma(attn: str = "eager", text_model: str = "gemma2"):
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    # PaliGemma 2's language model (Gemma 2: a sliding and a full layer; eager, as Gemma 2 asks), or
    # PaliGemma 1's (``text_model="gemma"``, full attention only); 16 image tokens per 8x8 image (patch 2)
    text = {"model_type": text_model, **TEXT, "head_dim": 8}
    if text_model == "gemma2":
        text |= {"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]}
    vision = {"model_type": "siglip_vision_model", "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1,
              "num_attention_heads": 2, "image_size": 8, "patch_size": 2, "projection_dim": 32}
    return PaliGemmaForConditionalGeneration(PaliGemmaConfig(text_config=text, vision_config=vision,
                                                             image_token_index=IMG, projection_dim=32,
                                                             attn_implementation=attn))


def paligemma_batch(prefix_lengths: tuple[int, ...] = (22, 19)) -> dict[str, torch.Tensor]:
    """PaliGemma's prefix-LM rows: 16 image tokens, then the prompt (both ``token_type_ids`` 0: the
    prefix, attended bidirectionally), then the suffix (type 1, causal, the only labels)."""
    ids = torch.randint(3, IMG - 1, (len(prefix_lengths), SEQ), generator=torch.Generator().manual_seed(11))
    ids[:, :16], ids[:, 16] = IMG, 1
    types = torch.stack([(torch.arange(SEQ) >= n).long() for n in prefix_lengths])
    labels = ids.masked_fill(types == 0, -100)
    pixels = torch.randn(len(prefix_lengths), 3, 8, 8, generator=torch.Generator().manual_seed(12))
    return {"input_ids": ids, "token_type_ids": types, "labels": labels, "pixel_values": pixels}


def _row_with_images(spans: list[tuple[int, int]], seed: int) -> torch.Tensor:
    """A row of text tokens with image placeholders at ``spans`` (start, length), delimited."""
    row = torch.randint(3, IMG - 1, (SEQ,), generator=torch.Generator().manual_seed(seed))
    for start, n in spans:
        row[start - 1], row[start:start + n], row[start + n] = START, IMG, END
    return row


def _qwen_images(grids, seed: int = 5):
    """Qwen's flattened patches [patches, 3 * 1 * 2 * 2] and their [t, h, w] grids, in token order."""
    grid = torch.tensor(grids)
    patches = int(grid.prod(-1).sum())
    pixels = torch.randn(patches, 12, generator=torch.Generator().manual_seed(seed))
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
        batch.update(_qwen_images(grids), mm_token_type_ids=(ids == IMG).long())
    else:
        batch["pixel_values"] = torch.randn(n_images, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    return batch


def pad_left(batch: dict[str, torch.Tensor], pads: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """``batch`` with row ``i`` shifted right by ``pads[i]`` behind left padding (what a processor
    with ``padding_side="left"`` makes): the per-token tensors move, the last tokens fall off (text
    only in these batches), ``attention_mask`` marks the padding and ``labels`` ignore it and the
    first real token."""
    out = dict(batch)
    mask = torch.ones_like(batch["input_ids"])
    for key in _PER_TOKEN:
        if key not in batch:
            continue
        moved = torch.zeros_like(batch[key]) if key != "labels" else torch.full_like(batch[key], -100)
        for i, k in enumerate(pads):
            moved[i, k:] = batch[key][i, :SEQ - k]
            if key == "input_ids":
                mask[i, :k] = 0
        out[key] = moved
    out["attention_mask"] = mask
    for i, k in enumerate(pads):
        if k:  # predicted from the last pad, an empty attention row: ignored (README, "Semantics worth knowing")
            out["labels"][i, k] = -100
    return out


def qwen_video_batch(frames_apart: bool) -> dict[str, torch.Tensor]:
    """Two rows for a Qwen model: an image and a 2-frame video in the first, a larger 2-frame video in
    the second, the videos across the chunk borders at sp 2 (16) and 4 (24). Grids [t, h, w]: image
    [1, 4, 4] (4 tokens), videos [2, 2, 4] (4) and [2, 4, 4] (8). ``frames_apart``: each frame its own
    delimited span with a timestamp token between (Qwen3-VL's processor, whose ``get_rope_index`` splits
    a video into frames), else one span per video (Qwen2-VL, Qwen2.5-VL)."""
    ids = torch.randint(3, IMG - 1, (2, SEQ), generator=torch.Generator().manual_seed(21))
    ids[0, 3], ids[0, 4:8], ids[0, 8] = START, IMG, END

    def video(row: int, start: int, tokens: int) -> None:
        spans = [(start, tokens // 2), (start + tokens // 2 + 3, tokens // 2)] if frames_apart else [(start, tokens)]
        for lo, n in spans:  # between frames: END, a timestamp token, START
            ids[row, lo - 1], ids[row, lo:lo + n], ids[row, lo + n] = START, VIDEO, END

    video(0, 21, 4)
    video(1, 12, 8)
    grids = torch.tensor([[2, 2, 4], [2, 4, 4]])
    g = torch.Generator().manual_seed(22)
    batch = {"input_ids": ids, "labels": ids.masked_fill((ids == IMG) | (ids == VIDEO), -100),
             "mm_token_type_ids": (ids == IMG).long() + 2 * (ids == VIDEO).long(),
             "pixel_values_videos": torch.randn(int(grids.prod(-1).sum()), 12, generator=g), "video_grid_thw": grids}
    batch.update(_qwen_images([[1, 4, 4]], seed=23))
    return batch


def known_qwen3_vl_gap(name: str) -> bool:
    """Under the minimum transformers (5.14) Qwen3-VL's labelled forward is refused: the handle does not
    see its loss call there (README, "Vision-language models", a known gap)."""
    import transformers
    from packaging.version import Version

    return name == "qwen3_vl" and Version(transformers.__version__) < Version("5.23")


def run_or_expect_gap(fn, world: int, name: str, *args, **kwargs):
    """``run_distributed(fn, world, name, *args)``; where :func:`known_qwen3_vl_gap` holds, assert that the
    run is refused with the handle's error instead and return ``None``."""
    import pytest

    from tests.distributed import run_distributed

    if known_qwen3_vl_gap(name):
        with pytest.raises(RuntimeError, match="computed its loss without `self.loss_function`"):
            run_distributed(fn, world, name, *args, **kwargs)
        return None
    return run_distributed(fn, world, name, *args, **kwargs)


# name: (builder, batch family)
MODELS = {"qwen2_vl": (qwen2_vl, "qwen"), "qwen2_5_vl": (qwen2_5_vl, "qwen"),
          "qwen3_vl": (qwen3_vl, "qwen"), "llava": (llava, "llava"),
          "gemma3": (gemma3, "gemma3")}


# -- training data: samples with 0, 1 or 2 images, collated as a processor's batch ------------------

# Image spans (start, tokens) of a sample with n images, per family (Qwen's with their grids), placed
# across the chunk borders at sp 2 and 4.
_SAMPLE_SPANS = {
    "qwen": {1: ([(13, 6)], [[1, 4, 6]]), 2: ([(6, 4), (23, 2)], [[1, 4, 4], [1, 2, 4]])},
    "llava": {1: ([(12, 16)], None)},
    "gemma3": {1: ([(14, 4)], None), 2: ([(6, 4), (22, 4)], None)},
}
# Images per sample of VLMSamples, read in order 2 samples a batch. Over 2 DP replicas (replica g reads
# samples g, g + 2, ...): step 1 has images on both replicas (rows with 2 and 1, 1 and 0 images), step 2
# on one replica only (the other's vision tower gets no gradient), step 3 on neither. Over 1 replica:
# rows with 2 and 1, then 1 and 0 images, then a text-only batch.
IMAGE_COUNTS = (2, 1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0)
PADDED = (3, 5)  # right-padded samples: one beside an image row, one in a text-only batch
_PER_TOKEN = ("input_ids", "labels", "attention_mask", "mm_token_type_ids", "token_type_ids")


class VLMSamples(torch.utils.data.Dataset):
    """Full-length samples ``[SEQ]`` of one VLM family, each with its own images (``pixel_values``
    and, for Qwen, ``image_grid_thw``) or none; the samples of ``PADDED`` are right-padded. Gemma 3's
    samples mark their image tokens in ``token_type_ids`` (its bidirectional image blocks) when
    ``image_blocks``."""

    def __init__(self, family: str, counts: tuple[int, ...] = IMAGE_COUNTS, image_blocks: bool = True,
                 shuffled_over: int | None = None) -> None:
        self.family, self.counts, self.image_blocks = family, counts, image_blocks
        # dataset index -> designed sample: laid out so that a shuffled DistributedSampler over
        # ``shuffled_over`` replicas (seed 0, epoch 0: Lightning's training sampler) reads the samples
        # in the designed order, replica g the samples g, g + dp, ...
        self.layout = list(range(len(counts)))
        if shuffled_over is not None:
            dp = shuffled_over
            for g in range(dp):
                order = torch.utils.data.DistributedSampler(range(len(counts)), num_replicas=dp, rank=g, seed=0)
                for k, index in enumerate(order):
                    self.layout[index] = g + dp * k

    def __len__(self) -> int:
        return len(self.counts)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        i = self.layout[index]
        n = min(self.counts[i], max(_SAMPLE_SPANS[self.family]))
        spans, grids = _SAMPLE_SPANS[self.family][n] if n else ([], None)
        ids = _row_with_images(spans, seed=100 + i)
        mask = torch.ones_like(ids)
        if i in PADDED:
            mask[25:] = 0
        labels = ids.masked_fill((ids == IMG) | (mask == 0), -100)
        labels[:2] = -100  # a prompt
        item = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        if self.family == "qwen":
            item["mm_token_type_ids"] = (ids == IMG).long()
            if n:
                item.update(_qwen_images(grids, seed=200 + i))
        elif n:
            item["pixel_values"] = torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(200 + i))
        if self.family == "gemma3" and self.image_blocks:
            item["token_type_ids"] = (ids == IMG).long()
        return item


def vlm_collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """What a VLM processor's batch looks like: per-token tensors stacked ``[b, SEQ]``, the images of
    every row concatenated in row order (a row may have none; a batch without images has no
    ``pixel_values``)."""
    batch = {k: torch.stack([s[k] for s in samples]) for k in _PER_TOKEN if k in samples[0]}
    for key in ("pixel_values", "image_grid_thw"):
        parts = [s[key] for s in samples if key in s]
        if parts:
            batch[key] = torch.cat(parts)
    return batch


def compare_sp_step(model, ref, batch, dims, sp, what):
    """One forward and backward of ``model`` (Ulysses applied) on this rank's shard of ``batch`` against
    the untouched ``ref`` on the whole batch: logits at real tokens, loss, every gradient (summed over
    the SP group / sp, also as ratios). Returns the top-level components whose gradients were compared."""
    ref.zero_grad()
    model.zero_grad()
    ref_out = ref(**batch, use_cache=False)
    ref_out.loss.backward()
    out = model(**shard_batch(batch, dims.sp_rank, sp), use_cache=False)
    out.loss.backward()
    n = out.logits.shape[1]  # seq / sp, after the padding shard_batch adds to reach a multiple of sp
    lo = dims.sp_rank * n
    real = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))[:, lo:lo + n].bool()
    k = real.shape[1]  # this rank's real positions (fewer than n on the last ranks of a padded row)
    assert_close_rel(out.logits[:, :k][real], ref_out.logits[:, lo:lo + k][real], name=f"{what} logits")
    assert_close_rel(out.loss, ref_out.loss, name=f"{what} loss")
    total = sum(q.grad.double().norm() ** 2 for q in ref.parameters() if q.grad is not None) ** 0.5
    compared = set()
    for (pname, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        # a key bias's gradient is zero in exact arithmetic (softmax ignores a per-query constant):
        # rounding noise in both runs, not a quantity to compare
        if q.grad is None or q.grad.double().norm() < 1e-6 * total:
            assert p.grad is None or q.grad is None or p.grad.norm() < 1e-4 * total, pname
            continue
        g = p.grad.clone()
        dist.all_reduce(g, group=dims.sp_group)
        g /= sp  # what DDP's average over dp x sp ranks does with the SP gradient scale
        assert_close_rel(g, q.grad, name=f"{what} {pname}")
        assert abs(grad_ratio(g, q.grad) - 1) < 1e-5, f"{what} {pname}"
        compared.add(pname.split(".")[1] if pname.startswith("model.") else pname.split(".")[0])
    return compared

"""Vision-language models under SP, vision tower replicated: logits at real tokens, the loss and every
gradient (language model, vision tower, projector) equal the non-SP run, for an image batch whose image
tokens straddle the chunk borders and for a text-only batch with padding; composites Ulysses does not
run are refused, naming why (Gemma 3's image blocks: tests/test_image_blocks.py)."""

from __future__ import annotations

import pytest
import torch

from lightning_ulysses import apply_ulysses
from lightning_ulysses.models.analysis import UnsupportedModelError, analyse_model
from tests.distributed import run_distributed
from tests.vlm_models import (MODELS, SEQ, TEXT, compare_sp_step, pad_left, qwen2_vl, qwen_video_batch,
                              run_or_expect_gap, seeded, vlm_batch)


def _parity(rank, world, name, sp):
    from lightning_ulysses.parallel.mesh import build_mesh

    build, family = MODELS[name]
    dims = build_mesh("cpu", sp)
    ref = seeded(build)
    model = seeded(build)
    handle = apply_ulysses(model, dims.sp_group)
    compared = {}
    for images in (True, False):
        compared[images] = compare_sp_step(model, ref, vlm_batch(family, images), dims, sp, f"{name} images={images}")
    # left padding (a processor's padding_side="left"): mrope / positions skip the padding on the whole row
    compared["left-padded"] = compare_sp_step(model, ref, pad_left(vlm_batch(family, True), (3, 2)), dims, sp,
                                              f"{name} images, left-padded")
    handle.remove()
    # every component (vision tower, projector, language model; the head unless tied) was compared
    components = {n for n, c in model.model.named_children() if next(c.parameters(), None) is not None}
    return compared, components | {n for n, _ in model.named_parameters() if n.startswith("lm_head")}


@pytest.mark.parametrize("name,sp", [(n, sp) for n in MODELS for sp in (2, 4)])
def test_vision_language_parity(name, sp):
    results = run_or_expect_gap(_parity, sp, name, sp)
    if results is None:  # the known Qwen3-VL gap under the minimum transformers
        return
    compared, components = results[0]
    components = {c.split(".")[0] for c in components}
    # the image batch reaches every component's gradient; the text-only batch the language model's
    assert compared[True] == components == compared["left-padded"], (compared, components)
    assert "language_model" in compared[False], compared


def _odd_length(rank, world, name):
    from lightning_ulysses.parallel.mesh import build_mesh

    build, family = MODELS[name]
    dims = build_mesh("cpu", world)
    ref = seeded(build)
    model = seeded(build)
    handle = apply_ulysses(model, dims.sp_group)
    # 30 tokens at sp 4: shard_batch pads the rows to 32 (the images stay inside the first 30)
    batch = {k: v[:, :30] if k != "pixel_values" and v.dim() == 2 and v.shape[1] == SEQ else v
             for k, v in vlm_batch(family, True).items()}
    compared = compare_sp_step(model, ref, batch, dims, world, f"{name} 30 tokens at sp {world}")
    handle.remove()
    return compared


@pytest.mark.parametrize("name", list(MODELS))
def test_rows_whose_length_is_not_a_multiple_of_sp(name):
    results = run_or_expect_gap(_odd_length, 4, name)
    if results is None:  # the known Qwen3-VL gap under the minimum transformers
        return
    assert "language_model" in results[0], results[0]


def _video_parity(rank, world, name, sp):
    from lightning_ulysses.parallel.mesh import build_mesh

    build = MODELS[name][0]
    dims = build_mesh("cpu", sp)
    ref = seeded(build)
    batch = qwen_video_batch(frames_apart=name == "qwen3_vl")
    compared = {}
    for vision_sp in (False, True):
        model = seeded(build)
        handle = apply_ulysses(model, dims.sp_group, vision_sp=vision_sp)
        assert handle.vision_sp == vision_sp, handle.vision_sp_reason
        compared[vision_sp] = compare_sp_step(model, ref, batch, dims, sp, f"{name} videos vision_sp={vision_sp}")
        handle.remove()
    return compared


@pytest.mark.parametrize("name,sp", [(n, sp) for n in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl") for sp in (2, 4)])
def test_video_parity(name, sp):
    """Videos (``pixel_values_videos`` / ``video_grid_thw``, mrope's temporal positions, Qwen3-VL's frames
    apart) beside an image, across the chunk borders: exact with the tower replicated and split."""
    compared = run_or_expect_gap(_video_parity, sp, name, sp)
    if compared is None:  # the known Qwen3-VL gap under the minimum transformers
        return
    compared = compared[0]
    for c in compared.values():
        assert {"visual", "language_model"} <= c, c


def _ring_parity(rank, world, name, ulysses):
    from lightning_ulysses.parallel.mesh import build_mesh

    build, family = MODELS[name]
    dims = build_mesh("cpu", world).split(ulysses)
    assert (dims.ulysses_size, dims.ring_size) == (ulysses, world // ulysses)
    ref = seeded(build)
    batches = {"images": vlm_batch(family, True), "text": vlm_batch(family, False)}
    if family == "qwen":
        batches["videos"] = qwen_video_batch(frames_apart=name == "qwen3_vl")
    compared = {}
    for vision_sp in (False, True):
        model = seeded(build)
        handle = apply_ulysses(model, dims.sp_group, ring_group=dims.ring_group, ulysses_group=dims.ulysses_group,
                               vision_sp=vision_sp)
        assert (handle.ring_size, handle.vision_sp) == (dims.ring_size, vision_sp), handle.vision_sp_reason
        for what, batch in batches.items():
            compared[vision_sp, what] = compare_sp_step(model, ref, batch, dims, world,
                                                        f"{name} u{ulysses}xr{dims.ring_size} {what} vision_sp={vision_sp}")
        handle.remove()
    return compared


@pytest.mark.parametrize("name,ulysses", [("qwen2_vl", 2), ("qwen2_vl", 1), ("qwen3_vl", 2), ("llava", 2)],
                         ids=["qwen2_vl-2x2", "qwen2_vl-1x4", "qwen3_vl-2x2", "llava-2x2"])
def test_vision_language_parity_under_a_ring(name, ulysses):
    """sp=4 as ulysses x ring: images (and Qwen videos) merged on the whole row, then the language model's
    attention over the ring, with the tower replicated and split (vision_sp over the whole SP group)."""
    compared = run_or_expect_gap(_ring_parity, 4, name, ulysses)
    if compared is None:  # the known Qwen3-VL gap under the minimum transformers
        return
    compared = compared[0]
    for (vision_sp, what), c in compared.items():
        assert "language_model" in c, (vision_sp, what, c)
        if what != "text":
            assert {"visual"} <= c or {"vision_tower", "multi_modal_projector"} <= c, (vision_sp, what, c)


def test_other_composites_are_refused():
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    audio = Qwen2AudioForConditionalGeneration(Qwen2AudioConfig(
        text_config={"model_type": "qwen2", **TEXT},
        audio_config={"d_model": 16, "encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 16,
                      "num_mel_bins": 8, "max_source_positions": 16}))
    with pytest.raises(UnsupportedModelError, match=r"composite model with components Ulysses does not run \(audio_config"):
        analyse_model(audio, 2)


@pytest.mark.parametrize("arch, cls", [("mllama", "MllamaForConditionalGeneration"),
                                       ("kosmos-2.5", "Kosmos2_5ForConditionalGeneration")])
def test_composites_whose_language_model_embeds_the_tokens_are_refused(arch, cls):
    """Mllama reads its images through cross-attention and Kosmos-2.5's language model embeds the ids itself:
    nothing merged into inputs_embeds for Ulysses to cut, so refused before the first forward."""
    from lightning_ulysses.support.configs import build_tiny
    from lightning_ulysses.support.images import image_config_kwargs

    model = build_tiny(arch, cls, dtype=torch.float32, **image_config_kwargs(arch))
    with pytest.raises(UnsupportedModelError, match=r"hands its language model '[^']+' .* the token ids"):
        analyse_model(model, 2)


def test_vision_tower_keeps_its_backend_and_remove_restores():
    """Only the language model's config points at the Ulysses attention; remove() restores all."""

    def run(rank, world):
        from lightning_ulysses.parallel.mesh import build_mesh

        model = qwen2_vl()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        handle = apply_ulysses(model, build_mesh("cpu", 2).sp_group)
        text, vision = model.model.language_model.config, model.model.visual.config
        assert text._attn_implementation.startswith("ulysses_") and vision._attn_implementation == "sdpa"
        assert model.config.text_config is text  # the private copy is one tree, as before
        handle.remove()
        assert model.model.language_model.config._attn_implementation == "sdpa"
        assert model.model.language_model.config is model.config.text_config
        assert "forward" not in model.model.language_model.__dict__
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        return True

    assert all(run_distributed(run, 2))

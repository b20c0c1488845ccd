"""Bidirectional blocks under SP: Gemma 3's image tokens (one block per image, from token_type_ids) and
PaliGemma's prefix-LM (one block: image and prompt) attend to each other both ways, causal elsewhere.

The rule (parallel/masks.py, ``SequenceMetadata.blocks``) equals transformers' own masks for both
models (full and sliding-window layers, with padding); flex's BlockMask equals the dense mask; flash
refuses it, and the segment path falls back to the dense mask. End to end, Gemma 3 at sp 2 and 4 and
PaliGemma (whose Gemma 2 says is_causal=False, while the mask it is handed is causal) at sp 2 and 4
equal the untouched model (logits, loss, every gradient) on batches whose blocks
straddle the chunk borders."""

from __future__ import annotations

import inspect

import warnings

import pytest
import torch

from lightning_ulysses import apply_ulysses, shard_batch
from lightning_ulysses.models.analysis import UnsupportedModelError, analyse_model
from lightning_ulysses.parallel.masks import SequenceMetadata
from lightning_ulysses.parallel.segments import attention_paths, plan_segments
from tests.distributed import assert_close_rel, run_distributed
from tests.vlm_models import IMG, SEQ, compare_sp_step, gemma3, paligemma, paligemma_batch, seeded, vlm_batch

S = 20
# Gemma 3 image runs: one of 5 tokens (longer than the window of 3), one of 2, one straddling the padding
TYPES = torch.zeros(2, S, dtype=torch.long)
TYPES[0, 2:7], TYPES[0, 11:13], TYPES[1, 4:8], TYPES[1, 15:19] = 1, 1, 1, 1
VALID = torch.ones(2, S, dtype=torch.bool)
VALID[1, 17:] = False


def _rule(model):
    rule = analyse_model(model, 2).composite.image_blocks
    assert rule is not None and rule.ids is not None and rule.key == "token_type_ids"
    return rule


def _ours(rule, types, valid, window):
    meta = SequenceMetadata.from_gathered(torch.arange(S).expand(2, S), valid)
    meta.blocks, meta.blocks_windowed = rule.ids(types).long(), rule.windowed
    return meta, meta.dense_mask(window)


def _no_cache(make) -> dict:
    # the mask builders' cache argument is `cache` from transformers 5.25 on, `past_key_values` before
    return {"cache" if "cache" in inspect.signature(make).parameters else "past_key_values": None}


def _assert_same_on_real_queries(hf, ours, valid):
    assert hf.shape == ours.shape
    rows = valid[:, None, :, None].expand_as(ours)  # HF's padding queries attend per its own convention
    assert torch.equal((hf == 0)[rows], ours[rows])


@pytest.mark.parametrize("window", [None, 3])
def test_gemma3_blocks_match_transformers(window):
    from transformers import Gemma3TextConfig
    from transformers.models.gemma3 import modeling_gemma3

    rule = _rule(gemma3())
    assert rule.windowed  # Gemma 3's sliding layers AND the window after ORing the image blocks in
    config = Gemma3TextConfig(sliding_window=3, attn_implementation="eager")
    make = modeling_gemma3.create_masks_for_vision_model
    hf = make(config=config, inputs_embeds=torch.zeros(2, S, 1), attention_mask=VALID.long(), **_no_cache(make),
              position_ids=torch.arange(S).expand(2, S),
              block_sequence_ids=modeling_gemma3.get_block_sequence_ids_for_mask(TYPES))
    meta, ours = _ours(rule, TYPES, VALID, window)
    _assert_same_on_real_queries(hf["full_attention" if window is None else "sliding_attention"], ours, VALID)
    # the blocks change the mask: a future image token is attended
    causal = SequenceMetadata.from_gathered(meta.position_ids, VALID).dense_mask(window)
    assert ours[0, 0, 2, 6] and not causal[0, 0, 2, 6]


@pytest.mark.parametrize("window", [None, 3])
def test_paligemma_prefix_matches_transformers(window):
    from transformers import Gemma2Config
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    rule = _rule(paligemma())
    assert not rule.windowed  # PaliGemma ORs its prefix in after the window
    types = torch.stack([(torch.arange(S) >= n).long() for n in (9, 14)])
    config = Gemma2Config(sliding_window=3, attn_implementation="eager")
    make = create_causal_mask if window is None else create_sliding_window_causal_mask
    hf = make(config=config, inputs_embeds=torch.zeros(2, S, 1), attention_mask=VALID.long(), **_no_cache(make),
              position_ids=torch.arange(S).expand(2, S), block_sequence_ids=torch.where(types == 0, 0, -1))
    _, ours = _ours(rule, types, VALID, window)
    _assert_same_on_real_queries(hf, ours, VALID)


@pytest.mark.parametrize("windowed", [True, False])
def test_flex_block_mask_with_blocks_matches_dense(windowed):
    from torch.nn.attention.flex_attention import flex_attention

    meta = SequenceMetadata.from_gathered(torch.arange(S).expand(2, S), VALID)
    meta.blocks, meta.blocks_windowed = torch.where(TYPES == 1, TYPES.cumsum(-1) // 10, -1), windowed
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 2, S, 8).unbind(0)
    for window in (None, 3):
        block_mask, _ = meta.for_backend("flex_attention", window, True, torch.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "flex_attention called without torch.compile"
            got = flex_attention(q, k, v, block_mask=block_mask)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=meta.dense_mask(window))
        assert_close_rel(got, want, name=f"flex window={window}")


def test_blocks_take_the_dense_path_and_flash_refuses_them():
    meta = SequenceMetadata.from_gathered(torch.arange(S).expand(2, S), None)
    assert meta.is_plain(None)
    meta.blocks = torch.where(TYPES == 1, 0, -1)
    assert not meta.is_plain(None)
    for backend in ("sdpa", "eager"):
        assert plan_segments(meta, backend, None, True) is None
        assert attention_paths(meta)[(backend, None, True)] == "dense"
    mask, extra = meta.for_backend("sdpa", None, True, torch.float32)
    assert mask is not None and extra == {"is_causal": False}
    with pytest.raises(ValueError, match="flex_attention"):
        meta.for_backend("flash_attention_2", None, True, torch.float32)


# -- end to end --------------------------------------------------------------------------------


def _gemma3_parity(rank, world, sp):
    from lightning_ulysses.parallel.mesh import build_mesh

    dims = build_mesh("cpu", sp)
    ref = seeded(gemma3)
    model = seeded(gemma3)
    handle = apply_ulysses(model, dims.sp_group)
    images = vlm_batch("gemma3", images=True)
    images["token_type_ids"] = (images["input_ids"] == IMG).long()
    text = vlm_batch("gemma3", images=False)
    text["token_type_ids"] = torch.zeros_like(text["input_ids"])
    compared = compare_sp_step(model, ref, images, dims, sp, "gemma3 image blocks")
    compare_sp_step(model, ref, text, dims, sp, "gemma3 text-only with token_type_ids")
    # the blocks matter: without token_type_ids the untouched model computes other logits
    with torch.no_grad():
        causal = ref(**{k: v for k, v in images.items() if k != "token_type_ids"}).logits
        blocks = ref(**images).logits
    # packed rows with image blocks: refused, naming both
    packed = dict(images, position_ids=torch.cat([torch.arange(16), torch.arange(16)]).expand(2, -1))
    with pytest.raises(UnsupportedModelError, match="packed rows .* bidirectional blocks"):
        model(**shard_batch(packed, dims.sp_rank, sp))
    handle.remove()
    return compared, ((blocks - causal).norm() / blocks.norm()).item()


@pytest.mark.parametrize("sp", [2, 4])
def test_gemma3_image_blocks_exact(sp):
    compared, blocks_change = run_distributed(_gemma3_parity, sp, sp)[0]
    assert {"vision_tower", "multi_modal_projector", "language_model"} <= compared, compared
    assert blocks_change > 1e-3


def _paligemma_parity(rank, world, sp):
    from lightning_ulysses.parallel.mesh import build_mesh

    dims = build_mesh("cpu", sp)
    ref = seeded(paligemma)
    model = seeded(paligemma)
    handle = apply_ulysses(model, dims.sp_group)
    # its Gemma 2 says is_causal=False (PaliGemma's use_bidirectional_attention); the mask it is handed is causal
    assert model.model.language_model.layers[0].self_attn.is_causal is False
    batch = paligemma_batch()
    compared = compare_sp_step(model, ref, batch, dims, sp, "paligemma prefix")
    compare_sp_step(model, ref, {k: v for k, v in batch.items() if k != "token_type_ids"}, dims, sp, "paligemma causal")
    # a row that needs SP padding and says nothing of it (position_ids, no attention_mask): the padding
    # would join the prefix, so it is refused; with an attention_mask the padding is masked
    odd = {k: v[:, :SEQ - 1] if k != "pixel_values" else v for k, v in batch.items()}
    with pytest.raises(UnsupportedModelError, match="multiple of sp"):
        model(**shard_batch({**odd, "position_ids": torch.arange(SEQ - 1).expand(2, -1)}, dims.sp_rank, sp))
    model(**shard_batch({**odd, "attention_mask": torch.ones_like(odd["input_ids"])}, dims.sp_rank, sp))
    handle.remove()
    return compared


@pytest.mark.parametrize("sp", [2, 4])
def test_paligemma_prefix_lm_exact(sp):
    compared = run_distributed(_paligemma_parity, sp, sp)[0]
    assert {"vision_tower", "multi_modal_projector", "language_model"} <= compared, compared


def _paligemma_sdpa(rank, world):
    from lightning_ulysses.parallel.mesh import build_mesh

    dims = build_mesh("cpu", world)
    ref = seeded(paligemma, "sdpa", "gemma")
    model = seeded(paligemma, "sdpa", "gemma")
    handle = apply_ulysses(model, dims.sp_group)
    batch = paligemma_batch()
    compare_sp_step(model, ref, batch, dims, world, "paligemma sdpa prefix")
    padded = {k: v for k, v in batch.items() if k != "token_type_ids"}
    padded["attention_mask"] = torch.ones_like(batch["input_ids"])
    padded["attention_mask"][1, -3:] = 0
    padded["labels"] = padded["labels"].masked_fill(padded["attention_mask"] == 0, -100)
    compare_sp_step(model, ref, padded, dims, world, "paligemma sdpa padded, causal")
    plain = {k: v for k, v in batch.items() if k != "token_type_ids"}
    with pytest.raises(UnsupportedModelError, match="marked bidirectional.*Pass token_type_ids"):
        model(**shard_batch(plain, dims.sp_rank, world))
    handle.remove()
    # what the refusal says: unpadded, without blocks, the untouched model is not causal
    with torch.no_grad():
        whole = ref(input_ids=plain["input_ids"], pixel_values=plain["pixel_values"]).logits[:, :4]
        first = ref(input_ids=plain["input_ids"][:, :4]).logits
    return float((whole - first).norm() / first.norm())


def test_paligemma_sdpa_switch_between_causal_and_bidirectional_is_refused():
    """With sdpa, transformers drops PaliGemma's causal mask on an unpadded batch without token_type_ids and
    its Gemma (is_causal=False) attends bidirectionally: refused by name; prefix and padded batches stay exact."""
    leak = run_distributed(_paligemma_sdpa, 2)[0]
    assert leak > 1e-3  # the first tokens' logits depend on later ones in the untouched model

"""Ulysses × ring under apply_ulysses: ``sp`` beyond the head count, exact against the non-SP model.

Every case compares logits, loss and every parameter gradient (summed over the SP group, / sp — what
DDP's average sees) with the untouched model on the full batch, in float32, to 1e-5 relative, and the
gradient ratio to 1 so that a factor-of-sp or factor-of-ring error cannot hide. The model with 2 query
heads and 1 KV head cannot run pure Ulysses at sp=4 at all.
"""

from __future__ import annotations

import pytest
import torch

from lightning_ulysses import apply_ulysses, shard_batch
from lightning_ulysses.parallel.mesh import build_mesh, choose_split
from lightning_ulysses.models.analysis import UnsupportedModelError
from tests.distributed import assert_close_rel, assert_sp_grads, run_distributed
from tests.models import tiny_model, tokens

SEQ = 32


def _batch(kind: str, seed: int) -> dict[str, torch.Tensor]:
    ids = tokens(2, SEQ, seed=seed)
    labels = ids.clone()
    labels[0, 3:7] = -100
    batch = {"input_ids": ids, "labels": labels}
    if kind == "padded":  # row 0 left-padded, row 1 right-padded
        mask = torch.ones(2, SEQ, dtype=torch.long)
        mask[0, :5], mask[1, -9:] = 0, 0
        batch["attention_mask"] = mask
        batch["labels"] = labels.masked_fill(mask == 0, -100)
    elif kind == "packed":  # documents restart their positions; no mask (transformers keeps them apart)
        batch["position_ids"] = torch.cat([torch.arange(n) for n in (11, 13, 8)]).expand(2, SEQ).clone()
    return batch


ZOO = {"gemma2": "Gemma2ForCausalLM",  # softcapping, query_pre_attn_scalar, alternating windows
       "gpt_oss": "GptOssForCausalLM",  # attention sinks (per-head parameters), windows
       "deepseek_v3": "DeepseekV3ForCausalLM"}  # MLA: Q/K and V head sizes differ


def _model(name: str):
    if name in ZOO:
        from tests.zoo.configs import build_tiny  # noqa: PLC0415

        return build_tiny(name, ZOO[name], dtype=torch.float32)
    if name == "gqa-2x1":  # fewer query heads than sp=4
        return tiny_model("llama", 2, 1)
    if name == "window-2x1":  # a window (5) shorter than one ring block
        return tiny_model("mistral", 2, 1, sliding_window=5)
    if name == "mha-4x4":
        return tiny_model("llama", 4, 4)
    raise KeyError(name)


def _one_case(dims, name: str, kind: str, seed: int) -> None:
    sp = dims.sp_size
    ref = _model(name)
    batch = _batch(kind, seed)
    ref_out = ref(**batch, use_cache=False)  # with a cache HF builds no packed-document mask
    ref_out.loss.backward()
    model = _model(name)
    groups = ({"ring_group": dims.ring_group, "ulysses_group": dims.ulysses_group} if dims.ring_size > 1 else {})
    handle = apply_ulysses(model, dims.sp_group, **groups)
    assert handle.ring_size == dims.ring_size and handle.ulysses_size == dims.ulysses_size
    shard = shard_batch(batch, dims.sp_rank, sp)
    out = model(**shard)
    out.loss.backward()
    chunk = SEQ // sp
    lo = dims.sp_rank * chunk
    what = f"{name}/{kind}/u{dims.ulysses_size}xr{dims.ring_size}"
    # padding positions hold no prediction (their query attends to itself only): compare real tokens
    real = batch.get("attention_mask", torch.ones(2, SEQ, dtype=torch.long))[:, lo:lo + chunk].bool()
    assert torch.isfinite(out.logits).all(), f"{what}: non-finite logits"
    assert_close_rel(out.logits[real], ref_out.logits[:, lo:lo + chunk][real], name=f"{what} logits")
    assert_close_rel(out.loss, ref_out.loss, name=f"{what} loss")
    assert_sp_grads(model, ref, dims.sp_group, sp, what)
    handle.remove()


def _parity(rank, world, sp, ulysses, cases):
    dims = build_mesh("cpu", sp).split(ulysses)
    assert (dims.ulysses_size, dims.ring_size) == (ulysses, sp // ulysses)
    for name, kind in cases:
        _one_case(dims, name, kind, seed=1 + dims.dp_rank)  # DP groups hold different rows
    return True


ALL_KINDS = [("gqa-2x1", "causal"), ("gqa-2x1", "padded"), ("gqa-2x1", "packed"), ("window-2x1", "causal"),
             ("window-2x1", "packed")]


@pytest.mark.parametrize("ulysses", [2, 1], ids=["2x2", "1x4"])
def test_ring_parity_beyond_the_head_count(ulysses):
    # 2 query heads / 1 KV head: pure Ulysses stops at sp=2; sp=4 as ulysses x ring.
    run_distributed(_parity, 4, 4, ulysses, ALL_KINDS)


def test_every_split_of_sp4_agrees_for_one_model():
    # a model pure Ulysses can serve too: 4x1 (no ring), 2x2 and 1x4 all equal the non-SP model
    for ulysses in (4, 2, 1):
        run_distributed(_parity, 4, 4, ulysses, [("mha-4x4", "causal"), ("mha-4x4", "padded")])


@pytest.mark.parametrize("ulysses", [2, 1], ids=["2x2", "1x4"])
def test_ring_parity_for_softcapping_sinks_and_mla(ulysses):
    run_distributed(_parity, 4, 4, ulysses, [(arch, "causal") for arch in ZOO] + [("gemma2", "padded")])


def test_ring_parity_with_data_parallel_groups():
    # dp=2 x (ulysses 2 x ring 2) on 8 ranks: each DP group its own rows
    run_distributed(_parity, 8, 4, 2, [("gqa-2x1", "causal"), ("gqa-2x1", "packed")])


def _mixer_refused(rank, world, family, exact):
    from tests.test_mixers import hybrid_model  # noqa: PLC0415

    dims = build_mesh("cpu", 2).split(1)
    model = hybrid_model(family)
    # a mixer this transformers runs exactly is refused for the ring; one it does not is refused anyway
    reason = "not across ring ranks. Use ring=1" if exact else "not one of the forms lightning_ulysses runs exactly"
    with pytest.raises(UnsupportedModelError, match=reason):
        apply_ulysses(model, dims.sp_group, ring_group=dims.ring_group, ulysses_group=dims.ulysses_group)
    assert not str(model.config._attn_implementation).startswith("ulysses")  # refused before anything is touched
    return True


def test_a_model_with_token_mixers_runs_no_ring():
    from tests.test_mixers import CURRENT_FORMS, exact_here  # noqa: PLC0415

    # the minimum-versions leg's transformers may give a family's mixer a form we do not run: take the
    # first family exact here, so that the ring refusal itself is what is checked whenever one is
    exact = [family for family in ("bamba", "qwen3_next", "nemotron_h") if exact_here(family)]
    assert exact or not CURRENT_FORMS
    run_distributed(_mixer_refused, 2, exact[0] if exact else "bamba", bool(exact))


def test_split_choice_and_its_errors():
    # largest Ulysses degree the heads allow that divides the processes per node; the rest is a ring
    assert choose_split(8, [1, 2], procs_per_node=8) == (2, 4)
    assert choose_split(8, [1, 2, 4, 8], procs_per_node=8) == (8, 1)
    assert choose_split(16, [1, 2, 4, 8, 16], procs_per_node=8) == (8, 2)  # all-to-alls stay on a node
    assert choose_split(4, [1, 2, 4], ring=4) == (1, 4)
    with pytest.raises(ValueError, match=r"ring=1 cannot split sp=4.*Valid splits: ulysses=2 x ring=2, "
                                         r"ulysses=1 x ring=4;"):
        choose_split(4, [1, 2], ring=1)
    with pytest.raises(ValueError, match=r"ring=2 cannot split sp=4.*runs no ring.*Valid splits: ulysses=4 x ring=1"):
        choose_split(4, [1, 2, 4], ring=2, ring_allowed=False)

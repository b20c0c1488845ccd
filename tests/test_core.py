"""apply_ulysses on real HF architectures: parity with the non-SP model, errors, reversibility."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lightning_ulysses import apply_ulysses, shard_batch
from lightning_ulysses.lightning.activation_checkpointing import checkpoint_decoder_layers
from lightning_ulysses.parallel.mesh import build_mesh
from tests.distributed import assert_close_rel, grad_ratio, run_distributed
from tests.models import tiny_model, tokens

WORLD = 4


def _labels(ids: torch.Tensor, seq: int, sp: int) -> torch.Tensor:
    """Uneven valid tokens: row 0 has labels only in its last chunk, row 1 drops a middle stretch."""
    labels = ids.clone()
    chunk = seq // sp
    labels[0, : seq - chunk + 1] = -100
    labels[1, chunk // 2 : chunk + 3] = -100
    return labels


def _reference(arch, heads, kv, seq, batch, extra):
    ref = tiny_model(arch, heads, kv, **extra)
    ids = tokens(batch, seq)
    labels = _labels(ids, seq, 4)
    out = ref(input_ids=ids, labels=labels)
    out.loss.backward()
    return ref, ids, labels, out


def _parity(rank, world, arch, heads, kv, sp, seq, batch, extra, pass_positions, overlap_chunks=1,
            checkpoint=False):
    dims = build_mesh("cpu", sp)
    ref, ids, labels, ref_out = _reference(arch, heads, kv, seq, batch, extra)
    model = tiny_model(arch, heads, kv, **extra)
    handle = apply_ulysses(model, dims.sp_group, overlap_chunks=overlap_chunks)
    if checkpoint:  # recomputation in backward re-runs the exchanges inside the backward pass
        checkpoint_decoder_layers(model, offload=True)
    shard = shard_batch({"input_ids": ids, "labels": labels}, dims.sp_rank, sp)
    if not pass_positions:  # the handle must derive global positions and shifted labels itself
        shard.pop("position_ids", None), shard.pop("shift_labels")
    out = model(**shard)
    out.loss.backward()
    chunk = seq // sp
    lo = dims.sp_rank * chunk
    assert_close_rel(out.logits, ref_out.logits[:, lo:lo + chunk], name="logits")
    assert_close_rel(out.loss, ref_out.loss, name="loss")
    for (name, p), (_, p_ref) in zip(model.named_parameters(), ref.named_parameters()):
        grad = p.grad.clone()
        dist.all_reduce(grad, group=dims.sp_group)  # what DDP's sum over the SP ranks sees
        grad /= sp
        assert_close_rel(grad, p_ref.grad, name=name)
        assert abs(grad_ratio(grad, p_ref.grad) - 1) < 1e-5, name
    handle.remove()
    return out.loss.item()


CASES = [
    # arch, heads, kv_heads, sp, extra config
    ("llama", 4, 4, 2, {}),  # MHA
    ("llama", 4, 4, 4, {}),
    ("llama", 8, 2, 2, {}),  # GQA, kv heads sharded
    ("llama", 8, 2, 4, {}),  # GQA, kv heads replicated (sp > Hkv)
    ("llama", 4, 1, 4, {}),  # MQA
    ("qwen2", 4, 2, 2, {}),  # attention biases
    ("qwen2", 8, 2, 4, {}),
    ("mistral", 8, 4, 4, {}),
    ("llama", 4, 2, 2, {"attn_implementation": "eager"}),
]


@pytest.mark.parametrize("arch,heads,kv,sp,extra", CASES, ids=[f"{c[0]}-h{c[1]}kv{c[2]}-sp{c[3]}-{len(c[4])}" for c in CASES])
def test_parity_with_non_sp_model(arch, heads, kv, sp, extra):
    losses = run_distributed(_parity, WORLD, arch, heads, kv, sp, 24, 2, extra, True)
    assert len(set(losses)) == 1  # identical on every SP rank (and both DP replicas use the same data)


def test_parity_derives_positions_and_shift_labels():
    """Without position_ids/shift_labels the handle derives global ones (RoPE and edge labels intact)."""
    run_distributed(_parity, WORLD, "llama", 4, 2, 4, 16, 3, {}, False)


def _zero_valid(rank, world):
    dims = build_mesh("cpu", 2)
    model = tiny_model()
    handle = apply_ulysses(model, dims.sp_group)
    ids = tokens(1, 8)
    out = model(input_ids=ids[:, dims.sp_rank * 4:(dims.sp_rank + 1) * 4],
                labels=torch.full((1, 4), -100))
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert all(torch.isfinite(p.grad).all() and not p.grad.any() for p in model.parameters())
    handle.remove()
    return True


def test_no_valid_labels_gives_zero_not_nan():
    run_distributed(_zero_valid, 2)


def _remove_restores(rank, world):
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = tiny_model("llama", 4, 2)
    ids = tokens(2, 16)
    before = model(input_ids=ids, labels=ids)
    attrs = set(vars(model)), {n: set(vars(m)) for n, m in model.named_modules()}
    keys = set(ALL_ATTENTION_FUNCTIONS), set(ALL_MASK_ATTENTION_FUNCTIONS)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    handle = apply_ulysses(model, dist.group.WORLD)
    assert model.config._attn_implementation.startswith("ulysses")
    assert set(model.state_dict()) == set(state)
    sharded = model(input_ids=ids[:, rank * 8:(rank + 1) * 8], labels=ids[:, rank * 8:(rank + 1) * 8])
    assert torch.isfinite(sharded.loss)
    handle.remove()
    handle.remove()  # idempotent
    after = model(input_ids=ids, labels=ids)
    assert torch.equal(before.logits, after.logits) and torch.equal(before.loss, after.loss)
    assert (set(vars(model)), {n: set(vars(m)) for n, m in model.named_modules()}) == attrs
    assert (set(ALL_ATTENTION_FUNCTIONS), set(ALL_MASK_ATTENTION_FUNCTIONS)) == keys
    assert model.config._attn_implementation == "sdpa"
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    return True


def test_remove_restores_model_exactly():
    run_distributed(_remove_restores, 2)


def _two_models(rank, world):
    """Two models in one process on different SP groups (sp=2 and sp=4) do not interfere."""
    dims2 = build_mesh("cpu", 2)
    m2, m4 = tiny_model("llama", 4, 4), tiny_model("llama", 4, 4)
    ref = tiny_model("llama", 4, 4)
    ids = tokens(1, 16)
    full = ref(input_ids=ids).logits
    h2, h4 = apply_ulysses(m2, dims2.sp_group), apply_ulysses(m4, dist.group.WORLD)
    assert h2.name != h4.name
    r2, r4 = dims2.sp_rank, rank
    assert_close_rel(m2(input_ids=ids[:, r2 * 8:(r2 + 1) * 8]).logits, full[:, r2 * 8:(r2 + 1) * 8])
    assert_close_rel(m4(input_ids=ids[:, r4 * 4:(r4 + 1) * 4]).logits, full[:, r4 * 4:(r4 + 1) * 4])
    h2.remove(), h4.remove()
    return True


def test_two_models_two_groups():
    run_distributed(_two_models, WORLD)


def _eval_modes(rank, world):
    model = tiny_model("llama", 4, 2)
    ids = tokens(2, 16)
    full = model(input_ids=ids).logits
    handle = apply_ulysses(model, dist.group.WORLD)
    model.eval()
    with torch.no_grad():
        local = model(input_ids=ids[:, rank * 8:(rank + 1) * 8]).logits
        assert_close_rel(local, full[:, rank * 8:(rank + 1) * 8], name="eval under SP")
        with handle.bypass():
            assert torch.equal(model(input_ids=ids).logits, full)
            generated = model.generate(ids[:, :4], max_new_tokens=3, do_sample=False)
        assert generated.shape == (2, 7)
    handle.remove()
    bypassing = apply_ulysses(model, dist.group.WORLD, eval_mode="bypass")
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, full)
    bypassing.remove()
    return True


def test_eval_runs_sharded_and_bypass_runs_plain():
    run_distributed(_eval_modes, 2)


def _errors(rank, world, case):
    dims = build_mesh("cpu", world)
    if case == "heads":
        with pytest.raises(ValueError, match=r"num_attention_heads=6 is not divisible by sp=4.*Choose sp from \[1, 2, 3, 6\]"):
            apply_ulysses(tiny_model("llama", 6, 6), dims.sp_group)
    elif case == "kv":
        with pytest.raises(ValueError, match=r"num_key_value_heads=3 and sp=4.*Choose sp from \[1, 3, 6, 12\]"):
            apply_ulysses(tiny_model("llama", 12, 3), dims.sp_group)
    elif case == "twice":
        model = tiny_model("llama", 4, 4)
        handle = apply_ulysses(model, dims.sp_group)
        with pytest.raises(ValueError, match="already has Ulysses applied"):
            apply_ulysses(model, dims.sp_group)
        handle.remove()
    elif case == "backend":
        model = tiny_model("llama", 4, 4)
        model.config._attn_implementation = "paged|eager"
        with pytest.raises(ValueError, match="not supported under Ulysses SP"):
            apply_ulysses(model, dims.sp_group)
    else:
        model = tiny_model("llama", 4, 4)
        handle = apply_ulysses(model, dims.sp_group)
        ids = tokens(1, 8)[:, rank * 2:(rank + 1) * 2]
        if case == "mask4d":
            with pytest.raises(ValueError, match="2D"):
                model(input_ids=ids, attention_mask=torch.ones(1, 1, 2, 2))
        elif case == "cache":
            from transformers import DynamicCache
            with pytest.raises(ValueError, match="KV cache"):
                model(input_ids=ids, past_key_values=DynamicCache(config=model.config))
        elif case == "uneven":
            with pytest.raises(ValueError, match="equal-length chunk"):
                model(input_ids=tokens(1, 8)[:, : 2 + (rank == 0)])
        handle.remove()
    return True


@pytest.mark.parametrize("case", ["heads", "kv", "twice", "backend", "mask4d", "cache", "uneven"])
def test_bad_layouts_and_inputs_raise(case):
    run_distributed(_errors, WORLD, case)


def test_backend_sees_its_own_name_and_local_groups():
    """HF's flash path picks its kernel from module.config._attn_implementation: under the patch the
    backend must see e.g. 'flash_attention_2', not the Ulysses name, and the local GQA group count."""
    from lightning_ulysses.parallel.attention import _LocalHeadsView

    model = tiny_model("llama", 8, 2)
    attn = model.model.layers[0].self_attn
    model.config._attn_implementation = "ulysses_test"
    view = _LocalHeadsView(attn, 4, "flash_attention_2")
    assert view.config._attn_implementation == "flash_attention_2"
    assert view.config.hidden_size == model.config.hidden_size and view.layer_idx == 0
    assert view.num_key_value_groups == 4 and attn.num_key_value_groups == 4
    view = _LocalHeadsView(attn, 1, "sdpa")
    assert view.num_key_value_groups == 1 and attn.num_key_value_groups == 4  # the module is untouched

"""Each class of model that used to be silently wrong under SP is exact at sp 2 and 4, and every
model Ulysses cannot run exactly is refused by apply_ulysses, before any forward, naming why."""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist

from lightning_ulysses import apply_ulysses, shard_batch
from lightning_ulysses.models.analysis import UnsupportedModelError, analyse_model
from lightning_ulysses.support.configs import build_tiny
from lightning_ulysses.support.parity import _call, _inputs, classify
from tests.distributed import assert_close_rel, grad_ratio, run_distributed

# (model_type, head, class): one representative of each class the issue lists.
EXACT_CASES = [
    ("mixtral", "causal", "MixtralForCausalLM"),  # MoE load-balancing loss and router-gate gradients
    ("qwen2_moe", "causal", "Qwen2MoeForCausalLM"),
    ("deepseek_v3", "causal", "DeepseekV3ForCausalLM"),  # MLA: Q/K and V head sizes differ
    ("gpt_oss", "causal", "GptOssForCausalLM"),  # attention sinks (per-head parameters)
    ("modernbert", "masked", "ModernBertForMaskedLM"),  # encoder, two-sided local windows, MLM loss
    ("opt", "causal", "OPTForCausalLM"),  # positions derived from the (left-)padding mask
    ("biogpt", "causal", "BioGptForCausalLM"),  # arange, although its position embedding could use the mask
    ("roberta", "masked", "RobertaForMaskedLM"),  # positions derived from the padding token
    ("gpt_bigcode", "causal", "GPTBigCodeForCausalLM"),  # module head layout differs from the config's
    ("phimoe", "causal", "PhimoeForCausalLM"),  # sliding window only in the model's mask
]


def _classify(rank, world, sp, cases):
    from lightning_ulysses.parallel.mesh import build_mesh

    dims = build_mesh("cpu", sp)
    return [classify(arch, head, cls, dims.sp_group) for arch, head, cls in cases]


@pytest.mark.parametrize("sp", [2, 4])
def test_each_class_is_exact(sp):
    verdicts = run_distributed(_classify, 4, sp, EXACT_CASES)[0]
    for v in verdicts:
        assert v.verdict == "exact", f"{v.arch} at sp={sp}: {v.verdict}: {v.reason} {v.details}"
        assert v.details, v.arch  # compared something
    moe = [v for v in verdicts if v.arch == "mixtral"][0]
    assert "plain/aux_loss" in moe.details and "padded/aux_loss" in moe.details


def _moe_gate_gradients(rank, world, sp):
    """The router gates' gradient (not only the loss) equals the non-SP one, as a ratio."""
    from lightning_ulysses.parallel.mesh import build_mesh

    dims = build_mesh("cpu", sp)
    kw = dict(dtype=torch.float32, output_router_logits=True, router_aux_loss_coef=0.5)
    ref, model = build_tiny("mixtral", "MixtralForCausalLM", **kw), build_tiny("mixtral", "MixtralForCausalLM", **kw)
    batch = _inputs("causal", padded=True)
    ref_out = _call(ref, batch)
    ref_out.loss.backward()
    handle = apply_ulysses(model, dims.sp_group)
    out = _call(model, shard_batch(batch, dims.sp_rank, sp))
    out.loss.backward()
    assert_close_rel(out.aux_loss, ref_out.aux_loss, name="aux_loss")
    assert_close_rel(out.loss, ref_out.loss, name="loss")
    gates = [(n, p, q) for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()) if "gate" in n
             and "proj" not in n and "up" not in n]
    assert gates
    for name, p, q in gates:
        g = p.grad.clone()
        dist.all_reduce(g, group=dims.sp_group)
        g /= sp
        assert_close_rel(g, q.grad, name=name)
        assert abs(grad_ratio(g, q.grad) - 1) < 1e-5, name
    handle.remove()
    return True


@pytest.mark.parametrize("sp", [2, 4])
def test_moe_aux_loss_and_gate_gradients(sp):
    run_distributed(_moe_gate_gradients, 4, sp)


def _shared_config(rank, world):
    """Policy + frozen reference built from one config object: SP on one leaves the other alone,
    and both trained side by side under SP are exact."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    torch.manual_seed(0)
    policy, reference = LlamaForCausalLM(cfg), LlamaForCausalLM(cfg)
    assert policy.config is reference.config  # what transformers does
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(3))
    full_ref = reference(input_ids=ids).logits
    handle = apply_ulysses(policy, dist.group.WORLD)
    # the reference still runs unpatched, on the full sequence, exactly as before
    assert reference.config._attn_implementation == "sdpa"
    assert torch.equal(reference(input_ids=ids).logits, full_ref)
    # ... and can be put under SP too (no "already applied"), both exact side by side
    handle_ref = apply_ulysses(reference, dist.group.WORLD)
    shard = shard_batch({"input_ids": ids, "labels": ids}, rank, world)
    torch.manual_seed(0)
    plain = LlamaForCausalLM(cfg.__class__(**cfg.to_dict()))
    expected = plain(input_ids=ids, labels=ids)
    expected.loss.backward()
    out = policy(**shard)
    with torch.no_grad():
        ref_out = reference(**shard)
    out.loss.backward()
    assert_close_rel(out.loss, expected.loss, name="policy loss")
    chunk = 16 // world
    assert_close_rel(ref_out.logits, full_ref[:, rank * chunk:(rank + 1) * chunk], name="reference logits")
    for (name, p), q in zip(policy.named_parameters(), plain.parameters()):
        g = p.grad.clone()
        dist.all_reduce(g)
        g /= world
        assert_close_rel(g, q.grad, name=name)
    handle.remove()
    handle_ref.remove()
    assert policy.config is reference.config and policy.config._attn_implementation == "sdpa"
    return True


@pytest.mark.parametrize("sp", [2, 4])
def test_models_sharing_a_config_are_isolated(sp):
    run_distributed(_shared_config, sp)


REFUSED = [
    ("falcon", "FalconForCausalLM", "inline"),  # attention computed inline, not through the interface
    ("bloom", "BloomForCausalLM", "inline"),
    ("lfm2", "Lfm2ForCausalLM", "convolution|recurrent attention mask"),  # short convolutions mix tokens
    ("mobilebert", "MobileBertForMaskedLM", "neighbouring tokens"),  # trigram embeddings
    ("bart", "BartForConditionalGeneration", "encoder-decoder"),
    ("mamba", "MambaForCausalLM", "no attention heads"),
    ("doge", "DogeForCausalLM", "own attention mask"),
]


@pytest.mark.parametrize("arch,cls,words", REFUSED, ids=[c[0] for c in REFUSED])
def test_refused_before_any_forward(arch, cls, words):
    model = build_tiny(arch, cls, dtype=torch.float32)
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(UnsupportedModelError) as info:
        analyse_model(model, 2)
    assert not calls
    assert re.search(words, str(info.value)), str(info.value)


@pytest.mark.parametrize("arch,cls,positions", [
    ("llama", "LlamaForCausalLM", "arange"),
    ("opt", "OPTForCausalLM", "from_mask"),  # the decoder fills in positions from the mask
    ("biogpt", "BioGptForCausalLM", "arange"),  # the base model fills in arange before the embedding's fallback
    ("roberta", "RobertaForMaskedLM", "from_input_ids"),
])
def test_positions_follow_the_first_fallback_that_runs(arch, cls, positions):
    assert analyse_model(build_tiny(arch, cls, dtype=torch.float32), 2).positions == positions


def test_models_outside_transformers_must_declare_attention_backends():
    from transformers import StableLmForCausalLM

    model = build_tiny("stablelm", "StableLmForCausalLM", dtype=torch.float32)
    assert not getattr(StableLmForCausalLM, "_supports_attention_backend", False)
    analyse_model(model, 2)  # transformers' own class: checked module by module (and exact in the matrix)

    class RemoteModel(StableLmForCausalLM):  # as if loaded with trust_remote_code (the head is its parent's)
        pass

    remote = RemoteModel(model.config)
    with pytest.raises(UnsupportedModelError, match="_supports_attention_backend.*outside transformers"):
        analyse_model(remote, 2)


def _moe_with_foreign_aux_loss():
    """A Mixtral whose class lives where no ``load_balancing_loss_func`` is (this test module): the
    auxiliary loss its forward adds cannot be recomputed over the whole sequence."""
    from transformers import MixtralConfig, MixtralForCausalLM

    class MyMixtralForCausalLM(MixtralForCausalLM):
        def forward(self, *args, **kwargs):  # adds the model's aux_loss, as the parent does
            return super().forward(*args, **kwargs)

    def build(router_logits: bool):
        cfg = MixtralConfig(vocab_size=32, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=2, num_local_experts=2,
                            output_router_logits=router_logits, attn_implementation="sdpa")
        return MyMixtralForCausalLM(cfg)

    return build


def _aux_refused_at_forward(rank, world):
    model = _moe_with_foreign_aux_loss()(router_logits=False)
    handle = apply_ulysses(model, dist.group.WORLD)
    assert handle.plan.aux_refused and handle.plan.aux_loss is None
    batch = shard_batch({"input_ids": torch.arange(8).reshape(1, 8) % 32}, rank, world)
    model(**batch)  # without router logits the model adds no auxiliary loss: runs
    with pytest.raises(UnsupportedModelError, match="call it with output_router_logits=False"):
        model(**batch, output_router_logits=True)
    handle.remove()
    return True


def test_unreproducible_aux_loss_is_refused():
    # asked for by the config: refused before any forward
    with pytest.raises(UnsupportedModelError, match="set output_router_logits=False"):
        analyse_model(_moe_with_foreign_aux_loss()(router_logits=True), 2)
    # asked for by one call: that call is refused
    assert all(run_distributed(_aux_refused_at_forward, 2))


def test_classifier_heads_are_refused():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    model = LlamaForSequenceClassification(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=16,
                                                       num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(UnsupportedModelError, match="neither a causal nor a masked LM head"):
        analyse_model(model, 2)


def test_shards_are_contiguous():
    ids = torch.arange(24).reshape(2, 12)
    out = shard_batch({"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}, 1, 3)
    for key in ("input_ids", "labels", "shift_labels", "attention_mask"):
        assert out[key].is_contiguous(), key
        out[key].view(-1)  # what models do with their labels


REASONS = [  # (arch, class, the refusal's class, or None: supported)
    ("dbrx", "DbrxForCausalLM", None),  # attn_config / ffn_config group settings of one model
    # default config: Mamba2 layers only; exact where its mixer's forward has a form we run exactly
    # (transformers 5.23), refused naming the mixer where not (5.14) — never "does not dispatch"
    ("granitemoehybrid", "GraniteMoeHybridForCausalLM", (None, "unsupported mixer")),
    ("mpt", "MptForCausalLM", "inline attention"),  # attn_config groups settings; attention is inline
    ("gemma3", "Gemma3ForConditionalGeneration", None),  # a vision tower beside the text model (replicated)
    ("qwen2_audio", "Qwen2AudioForConditionalGeneration", "composite"),  # an audio encoder: refused
    ("gptj", "GPTJForCausalLM", "does not dispatch"),
    ("bart", "BartForConditionalGeneration", "encoder-decoder"),
    ("mamba", "MambaForCausalLM", "no attention heads"),
]


@pytest.mark.parametrize("arch,cls,expected", REASONS, ids=[c[0] for c in REASONS])
def test_refusal_reason_is_true(arch, cls, expected):
    from lightning_ulysses.support.reasons import claim_holds, reason_class

    allowed = expected if isinstance(expected, tuple) else (expected,)
    model = build_tiny(arch, cls, dtype=torch.float32)
    try:
        analyse_model(model, 2)
    except UnsupportedModelError as e:
        got = reason_class(str(e))
        assert got in allowed, f"{arch}: refused as {got!r} ({e}), expected {expected!r}"
        assert claim_holds(got, model, str(e))
    else:
        assert None in allowed, f"{arch} was accepted, expected a refusal as {expected!r}"


@pytest.mark.parametrize("arch,cls,splits", [
    ("llama", "LlamaForCausalLM", True),  # create_causal_mask(..., position_ids=position_ids)
    ("gemma3_text", "Gemma3ForCausalLM", True),  # via mask_kwargs and its .copy() for the sliding mask
    ("gpt2", "GPT2LMHeadModel", True),  # its bidirectional builder masks cross-attention only
    ("gpt_oss", "GptOssForCausalLM", False),  # mask_kwargs without position_ids
    ("bert", "BertForMaskedLM", False),  # bidirectional self-attention mask
    ("qwen3_next", "Qwen3NextForCausalLM", False),  # gated delta-net carries state across documents
])
def test_which_models_keep_packed_documents_apart(arch, cls, splits):
    """Read from the model's own mask calls; the matrix checks each verdict against the model."""
    model = build_tiny(arch, cls, dtype=torch.float32)
    try:
        plan = analyse_model(model, 2)
    except UnsupportedModelError as e:
        # an older transformers' mixer form that lightning_ulysses does not run (Qwen3-Next under
        # 5.14): the whole model is refused, naming the mixer, so packed rows never reach it
        assert arch == "qwen3_next" and "mixes tokens through" in str(e), str(e)
        return
    assert plan.splits_packed_rows is splits

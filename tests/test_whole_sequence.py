"""What a model derives from the whole sequence, derived on it: parity with the non-SP model for the
configurations long-context users set (longrope / dynamic NTK past their thresholds, Llama 4's
temperature-tuned NoPE layers, mrope 3-D positions, BERT's token_type_ids, packed + padded rows),
and dropout masks that do not repeat across SP ranks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lightning_ulysses import apply_ulysses, shard_batch
from lightning_ulysses.parallel.mesh import build_mesh
from tests.distributed import assert_close_rel, grad_ratio, run_distributed

VOCAB = 97
SEQ = 32


def _ids(batch: int = 2, seq: int = SEQ, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _phi3_longrope():
    from transformers import Phi3Config, Phi3ForCausalLM

    head_dim = 8
    factors = dict(short_factor=[1.0 + 0.1 * i for i in range(head_dim // 2)],
                   long_factor=[3.0 + 0.5 * i for i in range(head_dim // 2)])
    config = Phi3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                        original_max_position_embeddings=12, pad_token_id=0, attn_implementation="sdpa",
                        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, **factors,
                                         "original_max_position_embeddings": 12})
    return Phi3ForCausalLM(config)


def _llama_dynamic():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=12,
                         attn_implementation="sdpa",
                         rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    return LlamaForCausalLM(config)


def _llama4_temperature():
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    config = Llama4TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, intermediate_size_mlp=48,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                              num_local_experts=2, num_experts_per_tok=1, interleave_moe_layer_step=2,
                              no_rope_layers=[1, 0], attention_chunk_size=12, attn_temperature_tuning=True,
                              floor_scale=3, attn_scale=0.5, max_position_embeddings=64, pad_token_id=0,
                              attn_implementation="sdpa")
    return Llama4ForCausalLM(config)


def _qwen2_vl_text():
    from transformers import Qwen2VLTextConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLTextModel

    config = Qwen2VLTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                "mrope_section": [1, 1, 2]},
                               attn_implementation="sdpa")
    return Qwen2VLTextModel(config)


def _bert():
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64, type_vocab_size=3,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="sdpa")
    return BertForMaskedLM(config)


def _mrope_positions(batch: int, seq: int) -> torch.Tensor:
    """[3, b, s] positions as get_rope_index makes them: a 3 x 4 'image' grid in the middle of the row."""
    pos = torch.arange(seq).expand(3, batch, seq).clone()
    start, t, h, w = 5, 1, 3, 4
    grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")).flatten(1)
    pos[:, :, start:start + h * w] = start + grid[:, None, :]
    tail = start + max(h, w)
    pos[:, :, start + h * w:] = torch.arange(tail, tail + seq - start - h * w)
    return pos


def _batch(kind: str) -> dict[str, torch.Tensor]:
    ids = _ids()
    if kind == "bert":
        labels = torch.full_like(ids, -100)
        labels[:, ::3] = ids[:, ::3]
        types = torch.zeros_like(ids)
        types[0, 10:] = 1
        types[1, 20:] = 2
        return {"input_ids": ids, "labels": labels, "token_type_ids": types}
    if kind == "mrope":
        return {"input_ids": ids, "position_ids": _mrope_positions(2, SEQ)}
    labels = ids.clone()
    labels[0, 3:7] = -100
    return {"input_ids": ids, "labels": labels}


MODELS = {"longrope": (_phi3_longrope, "lm"), "dynamic": (_llama_dynamic, "lm"),
          "llama4_temperature": (_llama4_temperature, "lm"), "mrope": (_qwen2_vl_text, "mrope"),
          "bert_token_types": (_bert, "bert")}


def _outputs(out, kind):
    return out.last_hidden_state if kind == "mrope" else out.logits


def _objective(out, kind):
    return out.last_hidden_state.pow(2).mean() if kind == "mrope" else out.loss


def _pair(name, sp):
    """The untouched reference and an identical model to shard, their batch, kind and SP mesh."""
    build, kind = MODELS[name]
    dims = build_mesh("cpu", sp)
    torch.manual_seed(0)
    ref = build().float()
    torch.manual_seed(0)
    model = build().float()
    return ref, model, _batch(kind), kind, dims


def _parity(rank, world, name, sp):
    ref, model, batch, kind, dims = _pair(name, sp)
    ref_out = ref(**batch, use_cache=False) if kind != "bert" else ref(**batch)
    _objective(ref_out, kind).backward()
    handle = apply_ulysses(model, dims.sp_group)
    shard = shard_batch(batch, dims.sp_rank, sp)
    if kind == "mrope":
        shard.pop("shift_labels", None)
    out = model(**shard)
    objective = _objective(out, kind)
    if kind == "mrope":  # a hidden-state objective: the mean of the whole sequence, as the loss is
        from lightning_ulysses import sp_token_mean

        per_token = out.last_hidden_state.pow(2).mean(-1)
        objective = sp_token_mean(per_token, torch.ones_like(per_token), dims.sp_group)
    objective.backward()
    n = SEQ // sp
    lo = dims.sp_rank * n
    assert_close_rel(_outputs(out, kind), _outputs(ref_out, kind)[:, lo:lo + n], name=f"{name} outputs")
    if kind != "mrope":
        assert_close_rel(out.loss, ref_out.loss, name=f"{name} loss")
    total = sum(q.grad.double().norm() ** 2 for q in ref.parameters() if q.grad is not None) ** 0.5
    for (pname, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        # a key bias's gradient is zero in exact arithmetic (softmax ignores a per-query constant):
        # rounding noise in both runs, not a quantity to compare
        if q.grad is None or q.grad.double().norm() < 1e-6 * total:
            continue
        g = p.grad.clone()
        dist.all_reduce(g, group=dims.sp_group)
        g /= sp
        assert_close_rel(g, q.grad, name=pname)
        assert abs(grad_ratio(g, q.grad) - 1) < 1e-5, pname
    handle.remove()
    return True


@pytest.mark.parametrize("sp", [2, 4])
@pytest.mark.parametrize("name", list(MODELS))
def test_whole_sequence_parity(name, sp):
    run_distributed(_parity, sp, name, sp)


def _error_without_whole_sequence(rank, world, name, sp):
    """Relative logits error of this rank's chunk when every rank derives positions from its chunk."""
    import lightning_ulysses.models.apply as apply_module

    apply_module.apply_whole_sequence = lambda *a, **k: (lambda: None)  # this forked worker only
    ref, model, batch, kind, dims = _pair(name, sp)
    with torch.no_grad():
        expected = ref(**batch, use_cache=False).logits
        handle = apply_ulysses(model, dims.sp_group)
        got = model(**shard_batch(batch, dims.sp_rank, sp)).logits
    handle.remove()
    n = SEQ // sp
    want = expected[:, dims.sp_rank * n:(dims.sp_rank + 1) * n]
    return ((got - want).norm() / want.norm()).item()


@pytest.mark.parametrize("name", ["longrope", "dynamic", "llama4_temperature"])
def test_chunk_local_derivation_would_be_wrong(name):
    """The cases above can fail: with each rank deriving from its own chunk, SP is not exact."""
    errors = run_distributed(_error_without_whole_sequence, 4, name, 4)
    assert max(errors) > 1e-4, errors  # parity holds to 1e-5


def test_rotary_state_is_the_non_sp_one():
    """dynamic NTK keeps its rescaled inv_freq; under SP it is the one the whole sequence sets."""

    def run(rank, world):
        dims = build_mesh("cpu", 2)
        torch.manual_seed(0)
        ref = _llama_dynamic().float()
        torch.manual_seed(0)
        model = _llama_dynamic().float()
        ids = _ids(1)
        ref(input_ids=ids, use_cache=False)
        handle = apply_ulysses(model, dims.sp_group)
        model(**shard_batch({"input_ids": ids}, dims.sp_rank, 2))
        assert torch.equal(model.model.rotary_emb.inv_freq, ref.model.rotary_emb.inv_freq)
        handle.remove()
        assert "forward" not in model.model.rotary_emb.__dict__  # the wrapper is gone after remove()
        return True

    run_distributed(run, 2)


def _packed_rows():
    """Two packed rows whose second ends in padding that restarts its positions (its own document)."""
    ids = _ids(2, 24)
    pos = torch.tensor([list(range(10)) + list(range(14)), list(range(7)) + list(range(11)) + list(range(6))])
    labels = ids.clone()
    labels[pos == 0] = -100
    mask = torch.ones_like(ids)
    mask[1, 18:] = 0
    labels[1, 18:] = -100
    return ids, pos, labels, mask


def _packed(rank, world, sp, with_mask, policy):
    from tests.models import tiny_model

    dims = build_mesh("cpu", sp)
    ids, pos, labels, mask = _packed_rows()
    ref, model = tiny_model("llama", 4, 2), tiny_model("llama", 4, 2)
    ref_out = ref(input_ids=ids, position_ids=pos, labels=labels, use_cache=False)  # no mask: documents apart
    ref_out.loss.backward()
    handle = apply_ulysses(model, dims.sp_group, packed_documents=policy)
    batch = {"input_ids": ids, "position_ids": pos, "labels": labels}
    if with_mask:
        batch["attention_mask"] = mask
    try:
        out = model(**shard_batch(batch, dims.sp_rank, sp))
    except ValueError as e:
        handle.remove()
        return str(e)
    out.loss.backward()
    n = 24 // sp
    lo = dims.sp_rank * n
    real = mask[:, lo:lo + n].bool()
    assert_close_rel(out.logits[real], ref_out.logits[:, lo:lo + n][real], name="logits")
    assert_close_rel(out.loss, ref_out.loss, name="loss")
    for (pname, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        g = p.grad.clone()
        dist.all_reduce(g, group=dims.sp_group)
        assert abs(grad_ratio(g / sp, q.grad) - 1) < 1e-5, pname
        assert_close_rel(g / sp, q.grad, name=pname)
    handle.remove()
    return "exact"


@pytest.mark.parametrize("sp", [2, 4])
def test_packed_and_padded_rows_are_exact(sp):
    """Packed rows with restarting padding and no mask: what transformers' packing does, exactly."""
    assert run_distributed(_packed, sp, sp, False, "refuse") == ["exact"] * sp


def test_packed_rows_with_a_mask_are_refused_or_split_on_request():
    results = run_distributed(_packed, 2, 2, True, "refuse")
    assert all("attends across the documents" in r and "packed_documents='split'" in r for r in results)
    assert run_distributed(_packed, 2, 2, True, "split") == ["exact"] * 2


def _dropout_masks(rank, world, sp):
    from transformers import BertConfig, BertModel

    dims = build_mesh("cpu", sp)
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                 num_attention_heads=4, hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.0,
                                 attn_implementation="sdpa"), add_pooling_layer=False)
    seen = []
    drop = model.embeddings.dropout
    drop.register_forward_hook(lambda m, i, o: seen.append((o == 0).clone()))
    handle = apply_ulysses(model, dims.sp_group)
    assert handle.plan.dropout  # recorded by the analysis
    torch.manual_seed(5)
    model.train()
    model(**shard_batch({"input_ids": _ids(1, 16)}, dims.sp_rank, sp))
    after = torch.rand(4)  # the shared stream continues identically on every SP rank
    handle.remove()
    masks = [torch.zeros_like(seen[0]) for _ in range(sp)]
    dist.all_gather(masks, seen[0].contiguous(), group=dims.sp_group)
    peers = [torch.zeros_like(after) for _ in range(sp)]
    dist.all_gather(peers, after, group=dims.sp_group)
    return [m.clone() for m in masks], all(torch.equal(p, peers[0]) for p in peers)


def test_dropout_masks_differ_across_sp_ranks():
    masks, same_stream = run_distributed(_dropout_masks, 2, 2)[0]
    assert same_stream
    assert not torch.equal(masks[0], masks[1])  # without per-rank streams both chunks get one mask


def _packed_for_encoder(rank, world, policy):
    """BERT (bidirectional masks, which never read position_ids) on packed rows without a mask."""
    from tests.zoo.configs import build_tiny

    dims = build_mesh("cpu", 2)
    ids, pos, _, _ = _packed_rows()
    ref, model = (build_tiny("bert", "BertForMaskedLM", dtype=torch.float32) for _ in range(2))
    handle = apply_ulysses(model, dims.sp_group, packed_documents=policy)
    try:
        with torch.no_grad():
            out = model(**shard_batch({"input_ids": ids, "position_ids": pos}, dims.sp_rank, 2))
    except ValueError as e:
        return str(e)
    finally:
        handle.remove()
    # documents kept apart on request: each equals the non-SP model on that document alone
    lo = dims.sp_rank * 12
    expected = torch.zeros(2, 24, out.logits.shape[-1])
    with torch.no_grad():
        for row in range(2):
            starts = [i for i in range(24) if pos[row, i] == 0] + [24]
            for a, b in zip(starts, starts[1:]):
                expected[row, a:b] = ref(input_ids=ids[row:row + 1, a:b], position_ids=pos[row:row + 1, a:b]).logits[0]
    assert_close_rel(out.logits, expected[:, lo:lo + 12], name="split documents")
    return "split"


def test_packed_rows_a_model_attends_across_are_refused():
    """Without SP, BERT attends across packed documents (its masks ignore position restarts): SP
    refuses rather than keep them apart silently, and splits them only when asked."""
    results = run_distributed(_packed_for_encoder, 2, "refuse")
    assert all("BertForMaskedLM: its attention masks do not read position_ids" in r for r in results), results
    assert run_distributed(_packed_for_encoder, 2, "split") == ["split"] * 2


def test_cache_offset_goes_by_the_signatures_name_or_is_refused():
    """The chunk offset is handed to the cache argument the attention module's signature names
    (``cache`` from transformers 5.25, ``past_key_values`` before); a module that numbers its
    tokens from a cache length it cannot be given is refused before any forward."""
    from lightning_ulysses.models.analysis import analyse_model
    from lightning_ulysses.models.whole_sequence import cache_argument
    from lightning_ulysses.models.analysis import UnsupportedModelError

    model = _llama4_temperature()
    attention = model.model.layers[1].self_attn
    assert cache_argument(attention) in ("cache", "past_key_values")
    assert "model.layers.1.self_attn" in analyse_model(model, 2).offset_modules

    class NumbersFromAStoredCache(type(attention)):
        def forward(self, hidden_states, position_embeddings, attention_mask, **kwargs):
            # a cache kept on the module, not passed in: SP has no argument to hand the offset through
            seen = self.stored.get_seq_length(self.layer_idx)
            positions = torch.arange(hidden_states.shape[1]) + seen
            attention_interface = super().forward  # the backend call, as HF's modules name it
            return attention_interface(hidden_states * positions[None, :, None], position_embeddings, attention_mask)

    attention.__class__ = NumbersFromAStoredCache
    assert cache_argument(attention) is None
    with pytest.raises(UnsupportedModelError, match="takes no cache argument"):
        analyse_model(model, 2)

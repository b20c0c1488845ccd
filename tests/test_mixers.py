"""Hybrid models under SP: gated delta-net, Mamba2 and Mamba1 mixers are exact against the non-SP model.

Every parity case runs sp=2 and sp=4 in one world-4 fork and compares, in float32, real-token logits,
the loss and the gradients summed over the SP group / sp (relative 1e-5, gradient ratio 1) with:
* plain rows: the non-SP model;
* padded rows: the non-SP model given the same 2D ``attention_mask`` (HF zeroes padded tokens
  entering the mixer); no target is predicted from a padding position;
* packed rows (also with padding): every document run alone through the non-SP model (state and
  convolution start from zero at each document), loss = sum over documents / all targets. HF's own
  non-SP forward does not reset a mixer at a document start, so by default SP refuses packed rows
  for these models (the non-SP model would mix the documents); these cases opt in with
  ``packed_documents="split"``, whose meaning is exactly "every document alone".
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers
from packaging.version import Version

from lightning_ulysses import apply_ulysses, shard_batch
from lightning_ulysses.parallel.mesh import build_mesh
from lightning_ulysses.models.mixers import refusal_reason, sp_mixer_for
from tests.distributed import assert_close_rel, grad_ratio, run_distributed
from tests.models import VOCAB, tokens

WORLD = 4
# The mixer forms lightning_ulysses.models.mixers recognises were read from this transformers release (the
# one constraints.txt pins). An older one (the minimum-versions CI leg) may lack a model or give its
# mixer another form; that mixer must then be refused with a reason, never run inexactly.
FORMS_FROM = Version("5.23")
# transformers 5.25 reworked the mixers' forwards (hub-kernelised convolutions, a new cache API): none is one
# of the forms read from 5.23, so there every family must be refused with a reason, as before FORMS_FROM.
FORMS_UNTIL = Version("5.25")
CURRENT_FORMS = FORMS_FROM <= Version(transformers.__version__) < FORMS_UNTIL
SEQ = 24
PACKS = ([5, 9, 2, 8], [7, 3, 10, 4])  # document lengths per row
PADS = [(7, 0), (0, 5)]  # (left, right) pad counts per row: chunk edges fall inside the padding at sp 2 and 4

_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=256, tie_word_embeddings=False, attn_implementation="sdpa",
               initializer_range=0.2)
_MAMBA2 = dict(mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=2, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
               mamba_chunk_size=8)


def hybrid_model(family: str, seed: int = 0):
    """A tiny float32 hybrid LM: one mixer layer, one attention layer (FalconH1: both in each layer)."""
    import transformers as T

    if family == "qwen3_next":  # 4 value heads reading 2 key heads: sp 4 replicates key heads
        cls, cfg = T.Qwen3NextForCausalLM, T.Qwen3NextConfig(
            **_COMMON, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"], head_dim=8,
            linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
            linear_conv_kernel_dim=4, num_experts=0)
    elif family == "qwen3_5":  # the split-projection layout
        cls, cfg = T.Qwen3_5ForCausalLM, T.Qwen3_5TextConfig(
            **_COMMON, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"], head_dim=8,
            linear_num_value_heads=4, linear_num_key_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
            linear_conv_kernel_dim=4)
    elif family == "bamba":  # 8 heads sharing 2 B/C groups: sp 2 splits groups, sp 4 replicates them
        cls, cfg = T.BambaForCausalLM, T.BambaConfig(**_COMMON, **_MAMBA2, num_hidden_layers=2, attn_layer_indices=[1])
    elif family == "falcon_h1":
        cls, cfg = T.FalconH1ForCausalLM, T.FalconH1Config(
            **_COMMON, **_MAMBA2, num_hidden_layers=1, head_dim=8, mamba_d_ssm=64,
            ssm_multipliers=[0.5, 1.5, 0.7, 1.3, 0.9], ssm_in_multiplier=0.8,
            ssm_out_multiplier=4.0)
    elif family == "falcon_h1_nonorm":
        cls, cfg = T.FalconH1ForCausalLM, T.FalconH1Config(
            **_COMMON, **_MAMBA2, num_hidden_layers=1, head_dim=8, mamba_d_ssm=64, mamba_rms_norm=False)
    elif family == "nemotron_h":  # mixer, attention and MLP blocks
        cls, cfg = T.NemotronHForCausalLM, T.NemotronHConfig(
            **_COMMON, layers_block_type=["mamba", "attention", "mlp"], head_dim=8, ssm_state_size=8,
            mamba_num_heads=8, mamba_head_dim=8, n_groups=2, conv_kernel=4, chunk_size=8)
    elif family == "zamba2":  # a Mamba2 layer, then a Mamba2 layer after the shared attention block
        cls, cfg = T.Zamba2ForCausalLM, T.Zamba2Config(
            **_COMMON, num_hidden_layers=2, layers_block_type=["mamba", "hybrid"], mamba_d_state=8, mamba_d_conv=4,
            mamba_expand=2, mamba_ngroups=2, n_mamba_heads=8, chunk_size=8, num_mem_blocks=1)
    elif family == "granitemoehybrid":
        cls, cfg = T.GraniteMoeHybridForCausalLM, T.GraniteMoeHybridConfig(
            **_COMMON, num_hidden_layers=2, layer_types=["mamba", "attention"], num_local_experts=0,
            shared_intermediate_size=48, **{k: v for k, v in _MAMBA2.items() if k != "mamba_d_head"}, mamba_d_head=8)
    elif family == "jamba":  # Mamba1: 64 channels, state 8, dt rank 4; attention in layer 1
        cls, cfg = T.JambaForCausalLM, T.JambaConfig(
            **_COMMON, num_hidden_layers=2, attn_layer_offset=1, attn_layer_period=2, expert_layer_period=4,
            num_experts=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4)
    else:
        raise KeyError(family)
    torch.manual_seed(seed)
    model = cls(cfg).float()
    with torch.no_grad():  # slow decays (HF's init forgets within a few tokens) and non-trivial per-head parameters
        g = torch.Generator().manual_seed(seed)
        for _, mixer in _mixers(model):
            mixer.A_log.copy_(torch.empty_like(mixer.A_log).uniform_(0.02, 0.3, generator=g).log())
            dt_bias = mixer.dt_bias if hasattr(mixer, "dt_bias") else mixer.dt_proj.bias  # Mamba1: dt_proj's bias
            dt_bias.copy_(torch.empty_like(dt_bias).uniform_(-3.0, -1.0, generator=g))
            if mixer.conv1d.bias is not None:  # a non-zero bias makes padded tokens' conv outputs non-zero
                mixer.conv1d.bias.copy_(torch.empty_like(mixer.conv1d.bias).uniform_(-0.5, 0.5, generator=g))
            for name in ("D", "norm", "dt_layernorm", "b_layernorm", "c_layernorm"):
                p = getattr(mixer, name, None)
                p = getattr(p, "weight", p)
                if isinstance(p, torch.Tensor):
                    p.copy_(torch.empty_like(p).uniform_(0.5, 1.5, generator=g))
    return model


def _mixers(model):
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "A_log") and hasattr(m, "conv1d")]


def exact_here(family: str) -> bool:
    """Whether ``family`` runs exactly under SP with the installed transformers; when it does not
    (only allowed outside ``[FORMS_FROM, FORMS_UNTIL)``), checks that its mixers are refused with a reason."""
    try:
        model = hybrid_model(family)
    except (AttributeError, ImportError, TypeError, ValueError) as err:  # a class or config field it lacks
        if CURRENT_FORMS:
            raise
        pytest.skip(f"transformers {transformers.__version__} cannot build the {family} test model: {err}")
    mixers = [m for _, m in _mixers(model)]
    assert mixers, f"{family}: no mixer found"
    refused = [m for m in mixers if sp_mixer_for(m) is None]
    if not refused:
        return True
    assert not CURRENT_FORMS, f"{family}: transformers {transformers.__version__} mixers not recognised: {refused}"
    assert all(refusal_reason(m) for m in refused)
    return False


def _apply(model, group):
    """apply_ulysses, plus the mixers if this version of the handle does not apply them itself."""
    handle = apply_ulysses(model, group, packed_documents="split")
    undos = []
    for _, sub in model.named_modules():
        mixer = sp_mixer_for(sub)
        if mixer is not None and "forward" not in vars(sub):
            mixer.check(handle.sp_size)
            undos.append(mixer.apply(sub, lambda: handle._current if handle.active else None))
    return handle, undos


def _remove(handle, undos):
    for undo in undos:
        undo()
    handle.remove()


# -- references -------------------------------------------------------------------------------


def _packed_positions(packs) -> torch.Tensor:
    return torch.tensor([[p for n in lens for p in range(n)] for lens in packs])


def _case(kind: str):
    """(SP batch, real-token mask [b, SEQ])."""
    ids = tokens(2, SEQ)
    real = torch.ones(2, SEQ, dtype=torch.bool)
    if kind == "plain":
        return {"input_ids": ids, "labels": ids.clone()}, real
    if kind == "packed":
        pos = _packed_positions(PACKS)
        return {"input_ids": ids, "labels": ids.masked_fill(pos == 0, -100), "position_ids": pos}, real
    if kind == "packed_padded":  # row 0 ends in 8 pads, their own pseudo-document (as pack_documents makes)
        pos = _packed_positions(PACKS)
        real[0, SEQ - PACKS[0][-1]:] = False
        labels = ids.masked_fill((pos == 0) | ~real, -100)
        return {"input_ids": ids, "labels": labels, "position_ids": pos, "attention_mask": real.long()}, real
    for row, (left, right) in enumerate(PADS):
        real[row, :left] = False
        real[row, SEQ - right:] = False
    labels = ids.masked_fill(~real, -100)
    labels = labels.masked_fill(F.pad(~real[:, :-1], (1, 0), value=False), -100)  # nothing predicted from a pad
    return {"input_ids": ids, "labels": labels, "attention_mask": real.long()}, real


def _reference(model, batch, kind):
    """Non-SP logits [b, SEQ, V] and loss (backward done on ``model``)."""
    if not kind.startswith("packed"):
        out = model(**batch, use_cache=False)
        out.loss.backward()
        return out.logits.detach(), out.loss.detach()
    ids, labels = batch["input_ids"], batch["labels"]
    logits = torch.zeros(*ids.shape, VOCAB)
    total = torch.zeros(())
    for row, lens in enumerate(PACKS):
        lo = 0
        for n in lens:
            if not batch.get("attention_mask", ids)[row, lo]:  # padding: not a document
                lo += n
                continue
            doc_logits = model(input_ids=ids[row:row + 1, lo:lo + n], use_cache=False).logits
            logits[row, lo:lo + n] = doc_logits[0].detach()
            shifted = F.pad(labels[row, lo + 1:lo + n], (0, 1), value=-100)
            total = total + F.cross_entropy(doc_logits[0], shifted, ignore_index=-100, reduction="sum")
            lo += n
    count = (F.pad(labels[:, 1:], (0, 1), value=-100) != -100).sum()
    loss = total / count
    loss.backward()
    return logits, loss.detach()


def _parity(rank, world, family, kind):
    batch, real = _case(kind)
    ref = hybrid_model(family)
    ref_logits, ref_loss = _reference(ref, batch, kind)
    dims2 = build_mesh("cpu", 2)
    groups = {2: (dims2.sp_group, dims2.sp_rank), 4: (dist.group.WORLD, rank)}
    losses = []
    for sp in (2, 4):
        group, sp_rank = groups[sp]
        model = hybrid_model(family)
        handle, undos = _apply(model, group)
        # GraniteMoeHybridForCausalLM takes use_cache through **kwargs only, where the handle does not
        # (yet) turn it off; the mixer refuses the cache the model would build, so pass it here.
        extra = {"use_cache": False} if family == "granitemoehybrid" else {}
        out = model(**shard_batch(batch, sp_rank, sp), **extra)
        out.loss.backward()
        lo, hi = sp_rank * (SEQ // sp), (sp_rank + 1) * (SEQ // sp)
        r = real[:, lo:hi]
        tag = f"{family}/{kind}/sp{sp}/rank{sp_rank}"
        assert torch.isfinite(out.logits).all(), tag
        assert_close_rel(out.logits[r], ref_logits[:, lo:hi][r], name=f"{tag} logits")
        assert_close_rel(out.loss, ref_loss, name=f"{tag} loss")
        for (name, p), (_, p_ref) in zip(model.named_parameters(), ref.named_parameters()):
            grad = p.grad.clone()
            dist.all_reduce(grad, group=group)  # what DDP's sum over the SP ranks sees
            grad /= sp
            assert_close_rel(grad, p_ref.grad, name=f"{tag} grad {name}")
            assert abs(grad_ratio(grad, p_ref.grad) - 1) < 1e-5, f"{tag} grad ratio {name}"
        _remove(handle, undos)
        losses.append(out.loss.item())
    return losses


FAMILIES = ["qwen3_next", "qwen3_5", "bamba", "falcon_h1", "falcon_h1_nonorm", "nemotron_h", "zamba2",
            "granitemoehybrid", "jamba"]


# Every distinct code path gets plain, padded and packed rows; models that share the Bamba form
# (NemotronH, Zamba2, GraniteMoeHybrid) get packed rows (their own decoder wiring, the mixer path
# checked on Bamba), FalconH1 without its gated norm the plain rows that reach its other branch.
CASES = [(family, kind) for family in ("qwen3_next", "qwen3_5", "bamba", "falcon_h1", "jamba")
         for kind in ("plain", "padded", "packed")]
CASES += [("nemotron_h", "packed"), ("zamba2", "packed"), ("granitemoehybrid", "packed"), ("falcon_h1_nonorm", "plain")]


@pytest.mark.parametrize("family,kind", CASES, ids=[f"{f}-{k}" for f, k in CASES])
def test_hybrid_parity_with_non_sp_model(family, kind):
    if not exact_here(family):
        return
    results = run_distributed(_parity, WORLD, family, kind)
    for i in range(2):
        assert len({r[i] for r in results}) == 1  # one loss on every rank


@pytest.mark.parametrize("family", ["qwen3_next", "bamba"])
def test_packed_documents_with_padding(family):
    """Padding and packed documents together: each real document run alone is the reference."""
    if exact_here(family):
        run_distributed(_parity, WORLD, family, "packed_padded")


# -- recognition and layouts ---------------------------------------------------------------------


def test_registry_recognises_families_and_refuses_other_forms():
    import transformers as T

    if not CURRENT_FORMS:  # another transformers: each family is exact or refused (exact_here checks which)
        for family in FAMILIES:
            exact_here(family)
        return
    found = {}
    for family in ("qwen3_next", "qwen3_5", "bamba", "falcon_h1", "jamba"):
        model = hybrid_model(family)
        for _, sub in model.named_modules():
            mixer = sp_mixer_for(sub)
            if mixer is not None:
                found[family] = (mixer.family, mixer.valid_sp())
                assert refusal_reason(sub) is None
        layer = model.model.layers[-1]
        attention = getattr(layer, "self_attn", None)
        if attention is not None:  # attention is the attention path's, not a mixer
            assert sp_mixer_for(attention) is None and refusal_reason(attention) is None
    assert found == {"qwen3_next": ("gated delta-net", [1, 2, 4]), "qwen3_5": ("gated delta-net", [1, 2, 4]),
                     "bamba": ("Mamba2", [1, 2, 4, 8]), "falcon_h1": ("Mamba2", [1, 2, 4, 8]),
                     "jamba": ("Mamba1", [1, 2, 4, 8, 16, 32, 64])}
    # Mamba1 and gated delta-net forms we do not run exactly: refused, with the reason.
    mamba = T.MambaForCausalLM(T.MambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, state_size=8))
    mixer = mamba.backbone.layers[0].mixer
    assert sp_mixer_for(mixer) is None and "Mamba1 mixer whose forward is not Jamba's form" in refusal_reason(mixer)
    olmo = T.OlmoHybridForCausalLM(T.OlmoHybridConfig(
        **_COMMON, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"], pad_token_id=0))
    deltanets = [m for m in olmo.modules() if type(m).__name__.endswith("GatedDeltaNet")]
    assert deltanets and all(sp_mixer_for(m) is None and "not one of the forms" in refusal_reason(m) for m in deltanets)


def test_layouts_sp_cannot_split_raise_naming_valid_sp():
    import transformers as T

    if not (exact_here("qwen3_next") and exact_here("nemotron_h")):
        return
    gdn = T.Qwen3NextForCausalLM(T.Qwen3NextConfig(
        **_COMMON, num_hidden_layers=1, layer_types=["linear_attention"], head_dim=8, linear_num_value_heads=6,
        linear_num_key_heads=3, linear_key_head_dim=8, linear_value_head_dim=8,
        num_experts=0)).model.layers[0].linear_attn
    mamba = T.NemotronHForCausalLM(T.NemotronHConfig(
        **_COMMON, layers_block_type=["mamba"], head_dim=8, ssm_state_size=8, mamba_num_heads=6, mamba_head_dim=8,
        n_groups=2, chunk_size=8)).model.layers[0].mixer
    for module, valid in ((gdn, [1, 3, 6]), (mamba, [1, 2, 6])):
        mixer = sp_mixer_for(module)
        assert mixer.valid_sp() == valid
        for sp in valid:
            mixer.check(sp)
        for sp in (4, 5) if valid[1] == 3 else (3, 4):
            with pytest.raises(ValueError, match=rf"sp={sp} .*Choose sp from \[{', '.join(map(str, valid))}\]"):
                mixer.check(sp)


def _remove_and_bypass(rank, world, family):
    model = hybrid_model(family)
    ids = tokens(2, SEQ)
    full = model(input_ids=ids, use_cache=False).logits
    mixers = [m for _, m in _mixers(model)]
    before = [dict(vars(m)) for m in mixers]
    handle, undos = _apply(model, dist.group.WORLD)
    assert all("forward" in vars(m) for m in mixers)
    chunk = SEQ // world
    local = model(input_ids=ids[:, rank * chunk:(rank + 1) * chunk]).logits
    assert_close_rel(local, full[:, rank * chunk:(rank + 1) * chunk], name="sharded")
    with handle.bypass():  # the mixers run their own forward on the full sequence, no collectives
        assert torch.equal(model(input_ids=ids, use_cache=False).logits, full)
    _remove(handle, undos)
    _remove(handle, undos)  # idempotent
    assert [dict(vars(m)) for m in mixers] == before
    assert torch.equal(model(input_ids=ids, use_cache=False).logits, full)
    return True


@pytest.mark.parametrize("family", ["qwen3_next", "bamba"])
def test_remove_restores_and_bypass_runs_plain(family):
    if exact_here(family):
        run_distributed(_remove_and_bypass, 2, family)


def _checkpointed(rank, world, family):
    """Activation checkpointing re-runs the mixers (and their exchanges) in backward: same gradients."""
    from lightning_ulysses.lightning.activation_checkpointing import checkpoint_decoder_layers

    batch, _ = _case("packed")
    grads = []
    for checkpoint in (False, True):
        model = hybrid_model(family)
        handle, undos = _apply(model, dist.group.WORLD)
        if checkpoint:
            ckpt = checkpoint_decoder_layers(model)
        model(**shard_batch(batch, rank, world)).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        if checkpoint:
            ckpt.remove()
        _remove(handle, undos)
    for a, b in zip(*grads):
        assert_close_rel(b, a, name="checkpointed grad")
    return True


@pytest.mark.parametrize("family", ["qwen3_next", "bamba"])
def test_activation_checkpointing(family):
    if exact_here(family):
        run_distributed(_checkpointed, 2, family)



def test_model_valid_sp_and_calls_outside_an_sp_forward():
    from lightning_ulysses.models.context import ForwardContext
    from lightning_ulysses.parallel.masks import SequenceMetadata
    from lightning_ulysses.models.mixers import mixers_valid_sp

    if not (exact_here("bamba") and exact_here("qwen3_next")):
        return
    assert mixers_valid_sp(hybrid_model("bamba")) == [1, 2, 4, 8]
    assert mixers_valid_sp(hybrid_model("qwen3_next")) == [1, 2, 4]
    assert mixers_valid_sp(torch.nn.Linear(2, 2)) is None
    # A context left from an earlier forward (chunks of 6 tokens) must not drive a 24-token call, and
    # a handle that raises (no forward running) means a plain call: the module's own forward runs.
    model = hybrid_model("bamba")
    mixer = model.model.layers[0].mamba
    hidden = torch.randn(2, SEQ, 32)
    own = mixer(hidden)
    stale = ForwardContext(None, 0, 4, 6, SequenceMetadata(position_ids=torch.zeros(2, SEQ, dtype=torch.long)), 0)

    def raising():
        raise RuntimeError("no Ulysses forward is running")

    for get_context in (lambda: stale, raising, lambda: None):
        undo = sp_mixer_for(mixer).apply(mixer, get_context)
        assert torch.equal(mixer(hidden), own)
        undo()
    assert "forward" not in vars(mixer)


def _low_precision(rank, world, family):
    """bfloat16 weights, and float32 weights under bf16 autocast (where some projections stay
    float32): the SP path keeps every tensor's dtype as the module's own forward does."""
    ids = tokens(2, SEQ)
    chunk = SEQ // world
    errors = {}
    for mode in ("bf16", "autocast"):
        ref, model = hybrid_model(family), hybrid_model(family)
        if mode == "bf16":
            ref, model = ref.bfloat16(), model.bfloat16()
        precision = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast")
        with precision:
            full = ref(input_ids=ids, use_cache=False).logits.float()[:, rank * chunk:(rank + 1) * chunk]
        handle, undos = _apply(model, dist.group.WORLD)
        with precision:
            out = model(**shard_batch({"input_ids": ids, "labels": ids}, rank, world))
        out.loss.backward()
        _remove(handle, undos)
        errors[mode] = ((out.logits.float() - full).norm() / full.norm()).item()
    return errors


@pytest.mark.parametrize("family", ["qwen3_next", "bamba", "falcon_h1", "jamba"])
def test_low_precision_matches_non_sp(family):
    if not exact_here(family):
        return
    for errors in run_distributed(_low_precision, 2, family):
        # bf16 rounds at 4e-3; a dtype the module would not use (e.g. a float32 time step where the
        # module adds its bias in bf16) shows as ~1e-2
        assert all(err < 2e-3 for err in errors.values()), errors


def test_per_document_batches_short_documents_exactly():
    """Short documents share right-padded batched calls, long ones run alone: both equal one call per
    document for a causal kernel (here a decaying running sum, batch on dim 0, sequence on dim 2)."""
    from lightning_ulysses.models.mixers.common import SOLO_MIN_LEN, per_document

    def kernel(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # [b, c, s], [b, s] -> [b, c, s]
        state, outs = torch.zeros_like(x[..., 0]), []
        for t in range(x.shape[-1]):
            state = 0.9 * state + x[..., t] * w[:, None, t]
            outs.append(state)
        return torch.stack(outs, dim=-1)

    lengths = [[3, 17, SOLO_MIN_LEN + 5, 1, 40], [SOLO_MIN_LEN + 20, 3, 16, 7, 20]]
    spans = [[(sum(r[:i]), sum(r[:i + 1])) for i in range(len(r))] for r in lengths]
    seq = sum(lengths[0])
    x = torch.randn(2, 3, seq, requires_grad=True)
    w = torch.randn(seq, 2).t().contiguous().requires_grad_()
    batched = per_document(kernel, [x, w], [2, 1], 2, spans)
    alone = torch.cat([torch.cat([kernel(x[r:r + 1, :, lo:hi], w[r:r + 1, lo:hi]) for lo, hi in row], dim=2)
                       for r, row in enumerate(spans)])
    assert_close_rel(batched, alone, name="outputs")
    g = torch.randn_like(alone)
    grads = torch.autograd.grad(batched, [x, w], g)
    for got, want in zip(grads, torch.autograd.grad(alone, [x, w], g)):
        assert_close_rel(got, want, name="grads")

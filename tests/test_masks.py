"""Masks under SP: packed documents, padding and sliding windows are exact on every backend, or refused.

Model-level cases run sp=2 and sp=4 in one world-4 fork per (case, backend) and compare, in float32,
real-token logits, the loss and the gradients summed over the SP group / sp with the non-SP model
(relative 1e-5, gradient ratio 1). Packed documents are also compared with every document run
alone, and that non-SP reference is itself checked against the documents run alone.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, field

import pytest
import torch
import torch.distributed as dist

from lightning_ulysses import apply_ulysses, shard_batch
from lightning_ulysses.parallel.masks import SequenceMetadata, document_ids, varlen_kwargs
from lightning_ulysses.parallel.mesh import build_mesh
from lightning_ulysses.parallel.segments import SEGMENT_BACKENDS, attention_paths, dense_masks
from tests.distributed import assert_close_rel, grad_ratio, run_distributed
from tests.models import tiny_model, tokens

WORLD = 4
SEQ = 24
PACKS = ([5, 9, 2, 8], [7, 3, 10, 4])  # document lengths per row, batch 2, different packings
FLEX_SKIP = (
    "flex_attention cannot be checked end to end on CPU: torch 2.13 raises 'FlexAttention does not support "
    "backward on CPU', and HF's compiled CPU flex forward disagrees with sdpa (NaNs) even without SP. The flex "
    "BlockMask itself is checked against the dense mask in test_flex_block_mask_matches_dense_mask."
)
BACKENDS = ["sdpa", "eager", pytest.param("flex_attention", marks=pytest.mark.skip(reason=FLEX_SKIP))]


# -- batches ----------------------------------------------------------------------------------


def packed_positions(packs) -> torch.Tensor:
    """``[len(packs), sum(lens)]`` positions restarting at 0 at every document start."""
    return torch.tensor([[p for n in lens for p in range(n)] for lens in packs])


def doc_spans(packs) -> list[list[tuple[int, int]]]:
    spans = []
    for lens in packs:
        starts = [sum(lens[:i]) for i in range(len(lens))]
        spans.append([(s, s + n) for s, n in zip(starts, lens)])
    return spans


def pad_mask(pads: list[tuple[int, int]]) -> torch.Tensor:
    """``[b, SEQ]`` bool, True on real tokens; ``pads[row] = (left, right)`` pad counts."""
    valid = torch.ones(len(pads), SEQ, dtype=torch.bool)
    for row, (left, right) in enumerate(pads):
        valid[row, :left] = False
        valid[row, SEQ - right:] = False
    return valid


@dataclass
class Case:
    arch: str
    heads: int
    kv: int
    extra: dict
    batch: dict  # what the SP run is fed (full sequence, before shard_batch)
    real: torch.Tensor  # [b, SEQ] bool: tokens whose logits are compared
    ref_batch: dict = field(default_factory=dict)  # the non-SP run's batch, when it differs
    packs: tuple | None = None  # documents to run alone as a second reference


MISTRAL_WINDOW = {"sliding_window": 5}
QWEN2_WINDOWS = {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}  # layer 0 full, 1 sliding


def make_case(name: str) -> Case:
    ids = tokens(2, SEQ)
    if name.startswith("packed"):
        pos = packed_positions(PACKS)
        labels = ids.masked_fill(pos == 0, -100)  # what a packing collate gives: no cross-document target
        batch = {"input_ids": ids, "labels": labels, "position_ids": pos}
        real = torch.ones(2, SEQ, dtype=torch.bool)
        if name == "packed":
            return Case("llama", 4, 2, {}, batch, real, packs=PACKS)
        if name == "packed_window":  # window 5 shorter than the 8-, 9- and 10-token documents
            return Case("mistral", 4, 2, MISTRAL_WINDOW, batch, real, packs=PACKS)
        if name == "packed_padded":
            # A pack_documents last row: docs 5, 9, 2 then 8 pads as their own pseudo-document, with a
            # mask. HF without SP ignores packing when a mask is passed, so its reference runs unmasked
            # and SP keeps the documents apart under packed_documents="split" (refused by default).
            packs = ([5, 9, 2, 8], PACKS[1])
            real = pad_mask([(0, 8), (0, 0)])
            batch = dict(batch, attention_mask=real.long(), labels=labels.masked_fill(~real, -100),
                         position_ids=packed_positions(packs))
            ref_batch = {k: v for k, v in batch.items() if k != "attention_mask"}
            return Case("llama", 4, 2, {}, batch, real, ref_batch=ref_batch, packs=([5, 9, 2], PACKS[1]))
    pads = {
        # sp=4: chunk 3 is padding in both rows; sp=2: row 0's second chunk is padding
        "right_pad": [(0, 13), (0, 7)],
        # sp=2: chunk 0 is padding in both rows; sp=4: chunks 0 and 1
        "left_pad": [(14, 0), (12, 0)],
        "window_mixed_pad": [(5, 0), (0, 9)],
        "left_pad_hf_labels": [(14, 0), (12, 0)],
        "mistral_window": [(0, 0), (0, 0)],
        "qwen2_windows": [(0, 0), (0, 0)],
    }[name]
    real = pad_mask(pads)
    labels = ids.masked_fill(~real, -100)
    if not name.endswith("_hf_labels"):
        # No target is predicted from a padding position (with left padding: the first real token).
        # Such a prediction sees no real token; its value differs per backend (see the xfail below).
        labels = labels.masked_fill(torch.nn.functional.pad(~real[:, :-1], (1, 0), value=False), -100)
    batch = {"input_ids": ids, "labels": labels}
    if not real.all():
        batch["attention_mask"] = real.long()
    if name.endswith("_hf_labels"):
        # HF-style labels (-100 on pads only): SP ignores the target predicted from the last pad, so
        # the reference is the non-SP run with that target dropped.
        fixed = labels.masked_fill(torch.nn.functional.pad(~real[:, :-1], (1, 0), value=False), -100)
        ref_batch = {**batch, "labels": fixed}
        return Case("llama", 4, 2, {}, batch, real, ref_batch=ref_batch)
    if name == "mistral_window":
        return Case("mistral", 4, 2, MISTRAL_WINDOW, batch, real)
    if name in ("qwen2_windows", "window_mixed_pad"):
        return Case("qwen2", 4, 2, QWEN2_WINDOWS, batch, real)
    return Case("llama", 4, 2, {}, batch, real)


CASES = ["packed", "packed_window", "packed_padded", "right_pad", "left_pad", "mistral_window", "qwen2_windows",
         "window_mixed_pad"]


def docs_alone_logits(model, ids: torch.Tensor, packs) -> torch.Tensor:
    """Logits of every document run alone (non-SP), laid out like the packed rows; 0 elsewhere."""
    out = torch.zeros(ids.shape[0], ids.shape[1], model.config.vocab_size)
    with torch.no_grad():
        for row, spans in enumerate(doc_spans(packs)):
            for lo, hi in spans:
                out[row, lo:hi] = model(input_ids=ids[row:row + 1, lo:hi], use_cache=False).logits[0]
    return out


# -- model-level parity -------------------------------------------------------------------------


def _parity(rank, world, name, attn, overlap_chunks=1, path="segments"):
    """``overlap_chunks`` applies to the sp=2 run (at sp=4 each rank holds one query head); ``path``:
    ``"segments"`` (the default execution) or ``"dense"`` (the full-sequence mask of masks.py)."""
    case = make_case(name)
    dims2 = build_mesh("cpu", 2)
    groups = {2: (dims2.sp_group, dims2.sp_rank), 4: (dist.group.WORLD, rank)}
    real = case.real

    ref = tiny_model(case.arch, case.heads, case.kv, attn=attn, **case.extra)
    # use_cache=False: with a cache, HF builds no packed-document mask without SP.
    ref_out = ref(**(case.ref_batch or case.batch), use_cache=False)
    ref_out.loss.backward()
    assert torch.isfinite(ref_out.loss)
    alone = None
    if case.packs is not None:
        alone = docs_alone_logits(ref, case.batch["input_ids"], case.packs)
        assert_close_rel(ref_out.logits[real], alone[real], name="non-SP packed vs docs alone")

    losses = []
    for sp in (2, 4):
        group, sp_rank = groups[sp]
        model = tiny_model(case.arch, case.heads, case.kv, attn=attn, **case.extra)
        # packed + masked rows are kept apart only on request (the non-SP reference runs unmasked)
        split = "split" if name == "packed_padded" else "refuse"
        handle = apply_ulysses(model, group, overlap_chunks=overlap_chunks if sp == 2 else 1, packed_documents=split)
        shard = shard_batch(case.batch, sp_rank, sp)
        with dense_masks() if path == "dense" else contextlib.nullcontext():
            out = model(**shard)
            out.loss.backward()
        taken = set(attention_paths(handle._current.metadata).values())
        if attn in SEGMENT_BACKENDS:
            expected = {"dense", "causal"} if path == "dense" else {"segments", "segments+bands", "causal"}
            assert taken <= expected and taken - {"causal"}, f"{name}/{attn}: paths {taken}, wanted {path}"
        lo, hi = sp_rank * (SEQ // sp), (sp_rank + 1) * (SEQ // sp)
        r = real[:, lo:hi]
        tag = f"{name}/{attn}/sp{sp}/rank{sp_rank}"
        assert torch.isfinite(out.logits).all(), f"{tag}: non-finite logits (padding rows included)"
        assert_close_rel(out.logits[r], ref_out.logits[:, lo:hi][r], name=f"{tag} logits")
        if alone is not None:
            assert_close_rel(out.logits[r], alone[:, lo:hi][r], name=f"{tag} logits vs docs alone")
        assert_close_rel(out.loss, ref_out.loss, name=f"{tag} loss")
        for (pname, p), (_, p_ref) in zip(model.named_parameters(), ref.named_parameters()):
            grad = p.grad.clone()
            dist.all_reduce(grad, group=group)  # what DDP's sum over the SP ranks sees
            grad /= sp
            assert_close_rel(grad, p_ref.grad, name=f"{tag} grad {pname}")
            assert abs(grad_ratio(grad, p_ref.grad) - 1) < 1e-5, f"{tag} grad ratio {pname}"
        handle.remove()
        losses.append(out.loss.item())
    return losses


@pytest.mark.parametrize("path", ["segments", "dense"])
@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("name", CASES)
def test_mask_parity_with_non_sp_model(name, attn, path):
    results = run_distributed(_parity, WORLD, name, attn, 1, path)
    for sp_index in range(2):
        assert len({r[sp_index] for r in results}) == 1  # the same loss on every rank


LEFT_PAD_TARGET = (
    "With left padding and the usual labels (-100 on pads only), the last pad predicts the first real token. "
    "That pad query has no valid key: without SP, HF's sdpa gives it a zero attention output and eager a uniform "
    "average over ALL keys (future tokens included); under SP it attends to itself. Real-token logits agree but "
    "the loss and gradients would differ (~1e-3 relative). The library ignores targets predicted from padding."
)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_left_padding_with_hf_labels(attn):
    # Why the reference drops the target predicted from the last pad: see LEFT_PAD_TARGET.
    run_distributed(_parity, WORLD, "left_pad_hf_labels", attn)


def test_window_cases_are_meaningful():
    """The windowed references really differ from full attention, and Qwen2's layers really differ."""
    ids = tokens(2, SEQ)
    with torch.no_grad():
        full = tiny_model("mistral", 4, 2)(input_ids=ids).logits
        windowed = tiny_model("mistral", 4, 2, **MISTRAL_WINDOW)(input_ids=ids).logits
        assert (windowed - full).norm() > 1e-2 * full.norm()

        qwen = tiny_model("qwen2", 4, 2, **QWEN2_WINDOWS)
        assert qwen.config.layer_types == ["full_attention", "sliding_attention"]
        assert [layer.self_attn.sliding_window for layer in qwen.model.layers] == [None, 4]
        mixed = qwen(input_ids=ids).logits
        all_sliding = tiny_model("qwen2", 4, 2, **dict(QWEN2_WINDOWS, max_window_layers=0))(input_ids=ids).logits
        no_window = tiny_model("qwen2", 4, 2)(input_ids=ids).logits
        assert (mixed - all_sliding).norm() > 1e-2 * mixed.norm()
        assert (mixed - no_window).norm() > 1e-2 * mixed.norm()


# -- the rule itself ----------------------------------------------------------------------------


def brute_force_mask(positions, valid, window, causal):
    """The documented rule, one (row, query, key) at a time."""
    b, s = len(positions), len(positions[0])
    out = torch.zeros(b, 1, s, s, dtype=torch.bool)
    for row in range(b):
        doc, docs = 0, []
        for t in range(s):
            if t and positions[row][t] != positions[row][t - 1] + 1:
                doc += 1
            docs.append(doc)
        for q in range(s):
            for k in range(s):
                ok = (k <= q or not causal) and docs[k] == docs[q]
                # one-sided for causal layers, two-sided (|q - k| < window) for bidirectional ones
                ok = ok and (window is None or (k > q - window and (causal or k < q + window)))
                ok = ok and (valid is None or (bool(valid[row][k]) and bool(valid[row][q])))  # pads: self only
                out[row, 0, q, k] = ok or q == k
    return out


def random_layout(seed: int, b: int = 3, s: int = 13):
    rng = random.Random(seed)
    positions = []
    for _ in range(b):
        row = []
        while len(row) < s:
            row += list(range(rng.randint(1, 6)))
        positions.append(row[:s])
    valid = torch.ones(b, s, dtype=torch.bool)
    valid[0, :3] = False  # left padding
    valid[1, -4:] = False  # right padding
    if b > 2:
        valid[2, 5:7] = False  # a hole
    return torch.tensor(positions), valid


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("window", [None, 1, 4])
@pytest.mark.parametrize("causal", [True, False])
def test_dense_mask_matches_brute_force(seed, window, causal):
    positions, valid = random_layout(seed)
    meta = SequenceMetadata.from_gathered(positions, valid)
    assert meta.doc_ids is not None and meta.valid is not None
    expected = brute_force_mask(positions.tolist(), valid.tolist(), window, causal)
    assert torch.equal(meta.dense_mask(window, causal), expected)
    mask, extra = meta.for_backend("sdpa", window, causal, torch.float32)
    assert torch.equal(mask, expected) and extra == {"is_causal": False}
    additive, extra = meta.for_backend("eager", window, causal, torch.float64)
    assert additive.dtype == torch.float64 and extra == {}
    low = torch.tensor(torch.finfo(torch.float64).min, dtype=torch.float64)
    assert torch.equal(additive, torch.where(expected, torch.zeros((), dtype=torch.float64), low))


def test_dense_mask_without_padding_or_docs():
    positions = torch.arange(10).expand(2, 10)
    meta = SequenceMetadata.from_gathered(positions, torch.ones(2, 10, dtype=torch.bool))
    assert meta.valid is None and meta.doc_ids is None
    assert meta.for_backend("sdpa", None, True, torch.float32) == (None, {"is_causal": True})
    assert meta.for_backend("sdpa", 10, True, torch.float32) == (None, {"is_causal": True})  # window >= seq
    mask, extra = meta.for_backend("sdpa", 3, True, torch.float32)
    assert extra == {"is_causal": False}
    assert torch.equal(mask, brute_force_mask(positions.tolist(), None, 3, True))
    assert torch.equal(meta.dense_mask(None), torch.ones(10, 10, dtype=torch.bool).tril().expand(2, 1, 10, 10))


@pytest.mark.parametrize("window", [None, 3])
def test_rule_matches_transformers_masks(window):
    """Our rule equals HF's own non-SP masks where HF expresses it: packed docs (no padding) and padding."""
    from transformers import MistralConfig
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    config = MistralConfig(sliding_window=window, attn_implementation="eager")
    make = create_causal_mask if window is None else create_sliding_window_causal_mask
    positions = packed_positions(([3, 6, 1, 2], [12]))
    emb = torch.zeros(2, 12, 1)
    hf = make(config=config, inputs_embeds=emb, attention_mask=None, past_key_values=None, position_ids=positions)
    ours = SequenceMetadata.from_gathered(positions, None).dense_mask(window)
    assert torch.equal(hf == 0, ours)

    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[0, :4], valid[1, -3:] = False, False
    positions = torch.arange(12).expand(2, 12)
    hf = make(config=config, inputs_embeds=emb, attention_mask=valid, past_key_values=None, position_ids=positions)
    ours = SequenceMetadata.from_gathered(positions, valid).dense_mask(window)
    rows = valid[:, None, :, None].expand_as(ours)  # HF leaves padding queries fully masked; compare real ones
    assert torch.equal((hf == 0)[rows], ours[rows])


def test_flex_block_mask_matches_dense_mask():
    """The flex BlockMask (forward, uncompiled flex on CPU) gives what sdpa gives with the dense mask."""
    import warnings

    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    positions, valid = random_layout(3, b=2, s=20)
    meta = SequenceMetadata.from_gathered(positions, valid)
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 2, 20, 8).unbind(0)
    for window in (None, 4):
        block_mask, extra = meta.for_backend("flex_attention", window, True, torch.float32)
        assert isinstance(block_mask, BlockMask) and extra == {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "flex_attention called without torch.compile"
            got = flex_attention(q, k, v, block_mask=block_mask)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=meta.dense_mask(window))
        assert_close_rel(got, want, rtol=1e-5, name=f"flex window={window}")


# -- document ids, varlen kwargs, flash translation ---------------------------------------------


def test_document_ids():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert document_ids(pos).tolist() == [[0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 0, 0]]
    assert document_ids(torch.arange(8)[None]) is None
    assert document_ids(torch.arange(3, 9).expand(2, 6)) is None  # continuing positions: one document
    assert document_ids(torch.zeros(1, 4, dtype=torch.long)).tolist() == [[0, 1, 2, 3]]  # 1-token documents
    assert document_ids(torch.tensor([[5, 6, 0, 1, 7, 8]])).tolist() == [[0, 0, 1, 1, 2, 2]]  # any jump starts one


def test_document_ids_match_transformers():
    from transformers.masking_utils import find_packed_sequence_indices

    rng = random.Random(0)
    for _ in range(20):
        rows = []
        for _ in range(3):
            row = []
            while len(row) < 16:
                row += list(range(rng.randint(1, 7)))
            rows.append(row[:16])
        pos = torch.tensor(rows)
        ours, hf = document_ids(pos), find_packed_sequence_indices(pos)
        assert (ours is None) == (hf is None)
        if ours is not None:
            assert torch.equal(ours, hf)


def test_varlen_kwargs_batch_with_several_documents():
    doc = document_ids(packed_positions(PACKS))
    kw = varlen_kwargs(doc)
    expected = torch.tensor([0, 5, 14, 16, 24, 31, 34, 44, 48], dtype=torch.int32)
    assert torch.equal(kw["cu_seq_lens_q"], expected) and torch.equal(kw["cu_seq_lens_k"], expected)
    assert kw["cu_seq_lens_q"].dtype == torch.int32
    assert kw["max_length_q"] == kw["max_length_k"] == 10
    # a row that is one document, and rows with equal doc ids, stay separate documents
    kw = varlen_kwargs(document_ids(packed_positions(([5, 9, 2, 8], [24]))))
    assert kw["cu_seq_lens_q"].tolist() == [0, 5, 14, 16, 24, 48] and kw["max_length_q"] == 24
    kw = varlen_kwargs(torch.zeros(3, 4, dtype=torch.long))
    assert kw["cu_seq_lens_q"].tolist() == [0, 4, 8, 12] and kw["max_length_k"] == 4


def test_flash_translation():
    docs = SequenceMetadata.from_gathered(packed_positions(PACKS), None)
    mask, extra = docs.for_backend("flash_attention_2", 5, True, torch.bfloat16)
    assert mask is None and extra["cu_seq_lens_q"].tolist() == [0, 5, 14, 16, 24, 31, 34, 44, 48]
    valid = pad_mask([(3, 0), (0, 4)])
    padded = SequenceMetadata.from_gathered(torch.arange(SEQ).expand(2, SEQ), valid)
    mask, extra = padded.for_backend("flash_attention_3", None, True, torch.bfloat16)
    assert extra == {} and mask.dtype == torch.int32 and torch.equal(mask, valid.int())
    plain = SequenceMetadata.from_gathered(torch.arange(SEQ).expand(2, SEQ), None)
    assert plain.for_backend("flash_attention_2", 4, True, torch.bfloat16) == (None, {})


# -- refusals -----------------------------------------------------------------------------------


def test_flash_refuses_padding_with_packed_documents():
    valid = torch.ones(2, SEQ, dtype=torch.bool)
    valid[0, -3:] = False
    meta = SequenceMetadata.from_gathered(packed_positions(PACKS), valid)
    for backend in ("flash_attention_2", "flash_attention_3"):
        with pytest.raises(ValueError, match="flex_attention"):
            meta.for_backend(backend, None, True, torch.bfloat16)


def test_flash_refuses_non_causal():
    meta = SequenceMetadata.from_gathered(torch.arange(8)[None], None)
    with pytest.raises(ValueError, match="non-causal"):
        meta.for_backend("flash_attention_2", None, False, torch.bfloat16)


@pytest.mark.parametrize("backend", ["paged|sdpa", "sdpa_paged", "kernels-community/flash-attn", "flex",
                                     "flash_attention_4"])
def test_unsupported_backend_name_raises(backend):
    meta = SequenceMetadata.from_gathered(packed_positions(PACKS), None)
    with pytest.raises(ValueError, match="not supported under Ulysses SP"):
        meta.for_backend(backend, None, True, torch.float32)

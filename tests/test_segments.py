"""The segment path (segments.py): sdpa/eager on the pieces that interact, exact against the dense mask.

Attention-level cases call the backend exactly as the Ulysses attention does (``_backend_call`` with
HF's sdpa / the model's eager function) on full-sequence tensors ``[batch, heads, seq, head_dim]``,
once through a segment plan and once with the dense ``[b, 1, s, s]`` mask of masks.py, and compare
outputs at **every** position (padding included: the rule gives a padding query itself only) and
the Q/K/V gradients, float32, 1e-5 relative. Model-level parity of both paths against the non-SP
model is in test_masks.py (``test_mask_parity_with_non_sp_model[...-segments/dense]``).
"""

from __future__ import annotations

import resource
import types

import pytest
import torch
from torch import nn

from lightning_ulysses.parallel import segments
from lightning_ulysses.parallel.attention import _backend_call
from lightning_ulysses.parallel.masks import SequenceMetadata
from lightning_ulysses.parallel.segments import attention_paths, dense_masks, plan_segments
from tests.distributed import assert_close_rel, run_distributed
from tests.test_masks import packed_positions, random_layout


class _Attn(nn.Module):
    """What the backends read from an attention module (the view adds the KV group count)."""

    def __init__(self) -> None:
        super().__init__()
        self.config = types.SimpleNamespace()
        self.is_causal = True


def _attend(meta: SequenceMetadata, backend: str, window: int | None, dense: bool):
    module = _Attn()
    kwargs = {"scaling": 0.3, "dropout": 0.0, "sliding_window": window}
    if dense:
        mask, extra = meta.for_backend(backend, window, True, torch.float32)
        return _backend_call(backend, module, mask, {**kwargs, **extra})
    plan = plan_segments(meta, backend, window, True)
    assert plan is not None and attention_paths(meta)[(backend, window, True)].startswith("segments")
    return plan.bind(lambda m, extra: _backend_call(backend, module, m, {**kwargs, **extra}), backend)


def _check(positions: torch.Tensor, valid: torch.Tensor | None, backend: str, window: int | None,
           heads: int = 4, kv_heads: int = 2, name: str = "") -> SequenceMetadata:
    """Segments vs dense mask on random Q/K/V: outputs at every position and Q/K/V gradients."""
    b, s = positions.shape
    g = torch.Generator().manual_seed(s + (window or 0))
    q = torch.randn(b, heads, s, 8, generator=g)
    k, v = (torch.randn(b, kv_heads, s, 8, generator=g) for _ in range(2))
    grad = torch.randn(b, s, heads, 8, generator=g)
    results = []
    for dense in (True, False):
        meta = SequenceMetadata.from_gathered(positions, valid)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = _attend(meta, backend, window, dense)(*leaves, heads // kv_heads)
        out.backward(grad)
        results.append([out.detach()] + [x.grad for x in leaves])
    tag = f"{name}/{backend}/window={window}"
    for label, want, got in zip(("out", "dq", "dk", "dv"), *results):
        if window == 1 and label in ("dq", "dk"):
            # Each query sees only itself: the scores' gradient is zero and the dense path's dq/dk
            # are rounding noise; both must be negligible next to dv.
            scale = results[0][3].norm()
            assert got.norm() <= 1e-5 * scale and want.norm() <= 1e-5 * scale, f"{tag} {label}"
            continue
        assert_close_rel(got, want, name=f"{tag} {label}")
    return meta


WINDOWS = [None, 1, 3, 7, 100]  # 1: self only; 3 and 7: shorter than some documents; 100: longer than all


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_random_layouts_match_dense(backend, monkeypatch):
    """Documents of random lengths, left/right padding and a hole, 3 rows with different patterns;
    every piece size policy: batched (default), solo views (SOLO_MIN_LEN=4) and padded buckets."""
    for solo, bits in ((segments.SOLO_MIN_LEN, segments.BUCKET_BITS), (4, 1)):
        monkeypatch.setattr(segments, "SOLO_MIN_LEN", solo)
        monkeypatch.setattr(segments, "BUCKET_BITS", bits)
        for seed in (0, 1):
            positions, valid = random_layout(seed, b=3, s=29)
            for window in WINDOWS:
                _check(positions, valid, backend, window, name=f"seed{seed}/solo{solo}")


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_patterns_per_row_match_dense(backend, monkeypatch):
    """Named patterns: uneven packed documents (one crossing the sp=2/sp=4 chunk edges), left and
    right padding, a packed row ending in a padding pseudo-document, MQA and MHA heads."""
    monkeypatch.setattr(segments, "SOLO_MIN_LEN", 9)  # the 10- and 13-token documents run alone
    packs = ([3, 13, 2, 6], [10, 1, 1, 9, 3], [24])  # 3+13 crosses 12 (sp=2) and 6, 12, 18 (sp=4)
    positions = packed_positions(packs)
    valid = torch.ones(3, 24, dtype=torch.bool)
    valid[2, :7] = False  # left padding
    valid[1, -3:] = False  # a padding pseudo-document closing a packed row
    for window in WINDOWS:
        _check(positions, valid, backend, window, name="packed+padded")
        _check(positions, None, backend, window, heads=3, kv_heads=1, name="packed MQA")
    right = torch.ones(2, 24, dtype=torch.bool)
    right[0, -5:] = False
    right[1, -11:] = False
    for window in (None, 4):
        _check(torch.arange(24).expand(2, 24), right, backend, window, heads=2, kv_heads=2, name="right pad")


def test_plan_batches_equal_lengths_and_bands():
    """Many short documents become one call per length bucket; windows become one banded call."""
    meta = SequenceMetadata.from_gathered(packed_positions(([4] * 8 + [5] * 4, [4] * 13)), None)
    plan = plan_segments(meta, "sdpa", None, True)
    assert [(g.kind, g.length, g.q_idx.shape[0]) for g in plan.groups] == [("causal", 4, 21), ("causal", 5, 4)]
    # Documents that are consecutive rows of one group's output are read back as one run.
    assert plan.path == "segments" and plan.run_lengths == [32, 20, 52]
    windowed = plan_segments(meta, "sdpa", 3, True)
    # Blocks whose band holds one document's real tokens only share one mask; the blocks at document
    # starts have their own: [block, block + window - 1] = [1, 3] here.
    assert [g.kind for g in windowed.groups] == ["band", "band"] and windowed.path == "segments+bands"
    shared, edges = windowed.groups
    assert shared.mask.shape == (1, 1, 1, 3) and shared.q_idx.shape[0] == 52 * 2 - 2 * 25
    assert edges.mask.shape == (2 * 25, 1, 1, 3)
    plain = SequenceMetadata.from_gathered(torch.arange(16).expand(2, 16), None)
    assert plan_segments(plain, "sdpa", None, True) is None  # sdpa's own is_causal, no mask
    assert attention_paths(plain)[("sdpa", None, True)] == "causal"
    assert plan_segments(plain, "eager", None, True).groups[0].kind == "causal"
    assert plan_segments(meta, "sdpa", None, False) is None  # non-causal: the dense mask stays
    assert plan_segments(meta, "flex_attention", None, True) is None
    assert attention_paths(meta)[("sdpa", None, False)] == "dense"
    with dense_masks():
        assert plan_segments(meta, "sdpa", None, True) is None
    assert attention_paths(meta)[("sdpa", None, True)] == "dense"


# -- no [s, s] allocation -----------------------------------------------------------------------

SEQ_BIG = 1 << 15  # a dense bool mask is 1 GiB here, its float32 form 4 GiB; the budget is 512 MiB
BUDGET = 512 << 20


def _vm_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))


def _under_budget(rank, world):
    """Forward + backward of every pattern at ``SEQ_BIG`` under an address-space limit of
    ``BUDGET`` above what the process maps now; the dense path must fail under the same limit.

    Eager materialises ``[pieces, heads, L, L]`` weights per piece of length ``L`` by design, so it
    runs the packed case with documents of at most 1500 tokens.
    """
    torch.manual_seed(0)
    s = SEQ_BIG

    def packed(docs):  # the documents, then a padding pseudo-document up to s
        valid = torch.ones(1, s, dtype=torch.bool)
        valid[0, sum(docs):] = False
        return packed_positions([docs + [s - sum(docs)]]), valid

    long_docs, short_docs = packed([1000, 3000, 200, 12000] * 2), packed([500, 1500, 200, 800] * 8)
    left = torch.ones(1, s, dtype=torch.bool)
    left[0, : s // 4] = False
    cases = [("packed+pad/sdpa", *long_docs, None), ("packed+pad/eager", *short_docs, None),
             ("left pad/sdpa", torch.arange(s)[None], left, None),
             ("window 512/sdpa", torch.arange(s)[None], None, 512),
             ("packed window/sdpa", long_docs[0], None, 512)]
    q, k, v = (torch.randn(1, 1, s, 8, requires_grad=True) for _ in range(3))
    resource.setrlimit(resource.RLIMIT_AS, (_vm_bytes() + BUDGET, resource.RLIM_INFINITY))
    done = []
    for name, pos, valid, window in cases:
        meta = SequenceMetadata.from_gathered(pos, valid)
        out = _attend(meta, name.split("/")[1], window, dense=False)(q, k, v, 1)
        out.sum().backward()
        assert torch.isfinite(out).all()
        done.append(name)
        del out, meta
    refused = False
    try:
        meta = SequenceMetadata.from_gathered(*long_docs)
        _attend(meta, "sdpa", None, dense=True)(q, k, v, 1).sum().backward()
    except (RuntimeError, MemoryError):
        refused = True  # the budget really excludes an [s, s] mask
    return done, refused


def test_no_square_mask_at_long_sequence():
    """At 32K tokens the segment path runs packed, padded and windowed patterns in a 512 MiB budget
    that the dense mask (1 GiB of booleans alone) cannot fit: nothing allocated grows with s²."""
    (done, refused), = run_distributed(_under_budget, 1, init_pg=False, threads=1, timeout=180)
    assert done == ["packed+pad/sdpa", "packed+pad/eager", "left pad/sdpa", "window 512/sdpa", "packed window/sdpa"]
    assert refused, "the dense path fit the budget: the memory bound proves nothing"

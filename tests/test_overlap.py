"""``overlap_chunks``: head groups whose exchanges overlap attention, exact and really overlapped."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lightning_ulysses import apply_ulysses, shard_batch
from lightning_ulysses.parallel.attention import HeadLayout
from lightning_ulysses.parallel.mesh import build_mesh
from tests.distributed import run_distributed
from tests.models import tiny_model, tokens
from tests.test_core import WORLD, _parity
from tests.test_masks import _parity as _mask_parity

CASES = [
    # arch, heads, kv_heads, sp, overlap_chunks, extra config
    ("llama", 8, 8, 2, 2, {}),  # MHA: K/V split over the groups
    ("llama", 8, 8, 2, 4, {}),  # one query head per group
    ("llama", 8, 2, 2, 2, {}),  # GQA, one local KV head: it travels with group 0, all groups share it
    ("llama", 16, 4, 2, 4, {}),  # two local KV heads, four groups: each KV head serves two groups
    ("qwen2", 8, 4, 2, 2, {}),  # GQA with biases, KV split over the groups
    ("llama", 8, 2, 4, 2, {}),  # KV replicated (sp > Hkv) and grouped
    ("llama", 8, 2, 2, 2, {"attn_implementation": "eager"}),
]


@pytest.mark.parametrize("arch,heads,kv,sp,chunks,extra", CASES,
                         ids=[f"{c[0]}-h{c[1]}kv{c[2]}-sp{c[3]}-c{c[4]}-{len(c[5])}" for c in CASES])
def test_overlapped_parity_with_non_sp_model(arch, heads, kv, sp, chunks, extra):
    losses = run_distributed(_parity, WORLD, arch, heads, kv, sp, 24, 2, extra, True, chunks)
    assert len(set(losses)) == 1


def test_overlapped_parity_with_checkpointing_and_offload():
    """Non-reentrant recomputation runs the pipelined exchanges again inside the backward pass."""
    run_distributed(_parity, WORLD, "llama", 8, 2, 2, 24, 2, {}, True, 2, True)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["packed_padded", "window_mixed_pad"])
def test_overlapped_parity_with_masks(name, attn):
    results = run_distributed(_mask_parity, WORLD, name, attn, 2)
    assert len({r[0] for r in results}) == 1


def _in_flight(rank, world, heads, kv, chunks, layers):
    """How many exchanges are moving while each head group's attention runs, forward and backward."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from lightning_ulysses.parallel import comm

    pending = []
    init = comm.PendingExchanges.__init__

    def tracking_init(self, group):
        init(self, group)
        pending.append(self)

    # Forked worker: these patches die with the process.
    comm.PendingExchanges.__init__ = tracking_init
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    seen = {"forward": [], "backward": []}

    def spy(module, q, k, v, mask, **kwargs):
        state = pending[-1]
        seen["forward"].append(state.in_flight)
        out, weights = sdpa(module, q, k, v, mask, **kwargs)
        # fires when this group's output gradient has arrived, right before its attention backward
        out.register_hook(lambda grad: seen["backward"].append(state.in_flight))
        return out, weights

    ALL_ATTENTION_FUNCTIONS["sdpa"] = spy
    model = tiny_model("llama", heads, kv, layers=layers)
    apply_ulysses(model, dist.group.WORLD, overlap_chunks=chunks)
    ids = tokens(1, 16)
    model(**shard_batch({"input_ids": ids, "labels": ids}, rank, world)).loss.backward()
    assert all(p.in_flight == 0 for p in pending), "an exchange was never waited for"
    return seen, len(pending)


@pytest.mark.parametrize("heads,kv,chunks", [(8, 8, 2), (8, 2, 4)])
def test_exchanges_move_while_attention_computes(heads, kv, chunks):
    """Every group's attention, forward and backward, runs while the other groups' exchanges move.

    Forward: group g computes while groups g+1.. receive Q/K/V and groups ..g-1 send outputs back.
    Backward: every output-gradient exchange starts at once; group g's Q/K/V gradients travel during
    group g-1's attention backward. Without overlap each count would be 0.
    """
    layers = 2
    for seen, calls in run_distributed(_in_flight, 2, heads, kv, chunks, layers):
        assert calls == layers
        assert seen["forward"] == [chunks - 1] * chunks * layers
        assert seen["backward"] == [chunks - 1] * chunks * layers


def test_overlap_chunks_must_split_heads_evenly():
    layout = HeadLayout.validate(12, 6, 2)  # six query / three KV heads per rank
    assert layout.overlap_choices() == [1, 3, 6]
    with pytest.raises(ValueError, match=r"overlap_chunks=2 cannot split .* Choose overlap_chunks from \[1, 3, 6\]"):
        layout.check_overlap(2)
    with pytest.raises(ValueError, match="positive integer"):
        layout.check_overlap(0)
    assert HeadLayout.validate(16, 4, 2).overlap_choices() == [1, 2, 4, 8]  # 4 groups share 2 KV heads


def _refused_before_patching(rank, world):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = tiny_model("llama", 8, 8)
    before = set(ALL_ATTENTION_FUNCTIONS)
    with pytest.raises(ValueError, match="Choose overlap_chunks from"):
        apply_ulysses(model, dist.group.WORLD, overlap_chunks=3)
    assert set(ALL_ATTENTION_FUNCTIONS) == before and model.config._attn_implementation == "sdpa"
    return True


def test_bad_overlap_chunks_refused_before_patching():
    assert all(run_distributed(_refused_before_patching, 2))

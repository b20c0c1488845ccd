"""The zigzag layout of ring blocks (lightning_ulysses/parallel/zigzag.py): the exchange puts every half
where the layout says, its backward is the inverse exchange, and under ``apply_ulysses`` the causal work
of ring attention is the same on every ring rank, with the results of the contiguous layout and of the
non-SP model (float32, 1e-5 relative, gradients also as ratios)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lightning_ulysses import apply_ulysses, shard_batch
from lightning_ulysses.parallel.mesh import build_mesh
from lightning_ulysses.parallel.ring import contiguous_indices, record_ring_stats, zigzag_indices
from lightning_ulysses.parallel.zigzag import contiguous_halves, relayout, zigzag_halves
from tests.distributed import assert_close_rel, assert_sp_grads, run_distributed
from tests.test_ring_sp import SEQ, _batch, _model


def _exchange(rank, world):
    seq = 8 * world
    group = dist.group.WORLD
    # this rank's contiguous block, each token carrying its own index (and a second feature)
    x = contiguous_indices(seq, world, rank).double()[None, :, None].repeat(2, 1, 3).requires_grad_()
    z = relayout(x, 1, contiguous_halves(world), zigzag_halves(world), group)
    assert torch.equal(z[0, :, 0], zigzag_indices(seq, world, rank).double())
    back = relayout(z, 1, zigzag_halves(world), contiguous_halves(world), group)
    assert torch.equal(back, x)
    # the adjoint: <relayout(x), w> = <x, relayout^T(w)> with relayout^T the inverse exchange
    w = torch.randn(z.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    (z * w).sum().backward()
    expected = relayout(w, 1, zigzag_halves(world), contiguous_halves(world), group)
    assert torch.equal(x.grad, expected)
    return True


@pytest.mark.parametrize("world", [2, 3, 4])
def test_relayout_moves_each_half_to_its_zigzag_owner_and_back(world):
    assert all(run_distributed(_exchange, world))


def _work(rank, world, kind):
    """Per ring rank: scores computed under each layout, and parity of both with the non-SP model."""
    dims = build_mesh("cpu", world).split(1)  # a pure ring of 4: 2 query heads, 1 KV head
    torch.manual_seed(0)
    ref = _model("gqa-2x1")
    batch = _batch(kind, seed=1)
    ref_out = ref(**batch, use_cache=False)
    ref_out.loss.backward()
    scores, chunk = {}, SEQ // world
    lo = dims.sp_rank * chunk
    for layout in ("contiguous", "zigzag"):
        torch.manual_seed(0)
        model = _model("gqa-2x1")
        handle = apply_ulysses(model, dims.sp_group, ring_group=dims.ring_group, ulysses_group=dims.ulysses_group,
                               ring_layout=layout)
        with record_ring_stats() as stats:
            out = model(**shard_batch(batch, dims.sp_rank, world))
        out.loss.backward()
        what = f"{kind} {layout}"
        real = batch.get("attention_mask", torch.ones(2, SEQ, dtype=torch.long))[:, lo:lo + chunk].bool()
        assert_close_rel(out.logits[real], ref_out.logits[:, lo:lo + chunk][real], name=f"{what} logits")
        assert_close_rel(out.loss, ref_out.loss, name=f"{what} loss")
        assert_sp_grads(model, ref, dims.sp_group, world, what)
        scores[layout] = stats.scores_computed
        handle.remove()
    return scores


@pytest.mark.parametrize("kind", ["causal", "padded", "packed"])
def test_zigzag_balances_causal_ring_work_with_the_same_results(kind):
    per_rank = run_distributed(_work, 4, kind)
    contiguous = [r["contiguous"] for r in per_rank]
    zigzag = [r["zigzag"] for r in per_rank]
    if kind == "causal":
        # contiguous: ring rank j computes j + 1 of 4 blocks (halves cut at the middle: 4j + 3 of 16
        # half-pairs); zigzag: every rank the same
        assert contiguous[-1] > 2 * contiguous[0], contiguous
        assert len(set(zigzag)) == 1, zigzag
    # the makespan (the slowest rank) never grows, and for causal rows it shrinks
    assert max(zigzag) <= max(contiguous), (zigzag, contiguous)
    if kind != "packed":
        assert max(zigzag) < max(contiguous), (zigzag, contiguous)


def test_an_unknown_ring_layout_is_refused_at_construction():
    from lightning_ulysses import UlyssesStrategy

    with pytest.raises(ValueError, match="ring_layout must be 'zigzag' or 'contiguous', got 'mirrored'"):
        UlyssesStrategy(sp=2, ring_layout="mirrored")

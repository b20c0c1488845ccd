"""Ring attention kernel: exact against dense attention on the whole sequence, and skips what cannot interact.

Every case builds the same full-sequence inputs on every rank (seeded), runs
:func:`ring_attention` on its ring rank's block of tokens, and back-propagates a fixed random output
gradient. The parent scatters the blocks back to true token order and compares the output and the
gradients of query, key, value (and the sinks, summed over ranks) with plain dense float32 attention
on one process: relative error below 1e-5 and gradient ratio 1 (so a factor-of-ring error cannot
hide). One fork runs all cases of a (ring, layout) so the suite stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch
import torch.distributed as dist

from lightning_ulysses.parallel import ring as ring_module
from lightning_ulysses.parallel.masks import SequenceMetadata
from lightning_ulysses.parallel.ring import (
    RingStats,
    contiguous_indices,
    record_ring_stats,
    ring_attention,
    zigzag_indices,
)
from tests.distributed import assert_close_rel, grad_ratio, run_distributed

B, HQ, D = 2, 4, 8
LAYOUTS = {"contiguous": contiguous_indices, "zigzag": zigzag_indices}


@dataclass(frozen=True)
class Case:
    name: str
    seq: int = 32
    hkv: int = 2
    dv: int = D
    causal: bool = True
    window: int | None = None
    softcap: float | None = None
    sinks: bool = False
    packs: tuple[tuple[int, ...], ...] | None = None  # document lengths per row (positions restart)
    pads: tuple[tuple[int, int], ...] | None = None  # (left, right) padding per row

    def metadata(self) -> SequenceMetadata:
        if self.packs is None:
            positions = torch.arange(self.seq).expand(B, self.seq).clone()
        else:
            positions = torch.tensor([[p for n in lens for p in range(n)] for lens in self.packs])
        valid = None
        if self.pads is not None:
            valid = torch.ones(B, self.seq, dtype=torch.bool)
            for row, (left, right) in enumerate(self.pads):
                valid[row, :left] = False
                valid[row, self.seq - right:] = False
        return SequenceMetadata.from_gathered(positions, valid)

    def inputs(self) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(sum(map(ord, self.name)))
        return {
            "q": torch.randn(B, HQ, self.seq, D, generator=gen),
            "k": torch.randn(B, self.hkv, self.seq, D, generator=gen),
            "v": torch.randn(B, self.hkv, self.seq, self.dv, generator=gen),
            "sinks": torch.randn(HQ, generator=gen) if self.sinks else None,
            "grad": torch.randn(B, self.seq, HQ, self.dv, generator=gen),
        }


PACKS = ((5, 9, 2, 16), (7, 3, 10, 12))
CASES = [
    Case("causal"),
    Case("non_causal", causal=False),
    Case("padding_left_right", pads=((5, 0), (0, 7))),
    Case("packed", packs=PACKS),
    Case("packed_padded", packs=((6, 10, 12, 4), (3, 13, 8, 8)), pads=((0, 4), (3, 0))),
    Case("window_below_block", window=3),
    Case("window_above_block", window=11),
    Case("window_non_causal", causal=False, window=5),
    Case("mqa", hkv=1),
    Case("mha", hkv=HQ),
    Case("dv_differs", dv=5),
    Case("softcap", softcap=1.5),
    Case("sinks", sinks=True),
    Case("non_causal_packed_padded", causal=False, packs=PACKS, pads=((2, 3), (0, 0))),
    Case("everything", hkv=1, dv=6, window=7, softcap=2.0, sinks=True, packs=PACKS, pads=((0, 3), (4, 0))),
]


def reference(case: Case, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Dense attention on the whole sequence, one process, float32: output ``[b, s, Hq, dv]`` and
    the gradients of ``(out * grad).sum()``."""
    q, k, v = (x[n].clone().requires_grad_(True) for n in ("q", "k", "v"))
    leaves = [q, k, v]
    g = HQ // case.hkv
    scores = q @ k.repeat_interleave(g, 1).transpose(-1, -2) * D ** -0.5
    if case.softcap is not None:
        scores = case.softcap * torch.tanh(scores / case.softcap)
    scores = scores.masked_fill(~case.metadata().dense_mask(case.window, case.causal), float("-inf"))
    if case.sinks:
        sinks = x["sinks"].clone().requires_grad_(True)
        leaves.append(sinks)
        scores = torch.cat([scores, sinks.view(1, HQ, 1, 1).expand(B, HQ, case.seq, 1)], -1)
    probs = scores.softmax(-1)[..., :case.seq]
    out = (probs @ v.repeat_interleave(g, 1)).transpose(1, 2)
    grads = torch.autograd.grad((out * x["grad"]).sum(), leaves)
    names = ["q", "k", "v", "sinks"]
    return {"out": out.detach(), **{f"d{n}": gr for n, gr in zip(names, grads)}}


def run_ring(case: Case, token_index: list[torch.Tensor], ring_rank: int, group) -> dict:
    """This ring rank's output, gradients and :class:`RingStats` for ``case``."""
    x = case.inputs()
    idx = token_index[ring_rank]
    q = x["q"][:, :, idx].clone().requires_grad_(True)
    k = x["k"][:, :, idx].clone().requires_grad_(True)
    v = x["v"][:, :, idx].clone().requires_grad_(True)
    sinks = None if x["sinks"] is None else x["sinks"].clone().requires_grad_(True)
    leaves = [q, k, v] + ([sinks] if sinks is not None else [])
    with record_ring_stats() as stats:
        out = ring_attention(q, k, v, group=group, metadata=case.metadata(), token_index=token_index,
                             causal=case.causal, sliding_window=case.window, softcap=case.softcap, sinks=sinks)
    grads = torch.autograd.grad((out * x["grad"][:, idx]).sum(), leaves)
    names = ["q", "k", "v", "sinks"]
    return {"out": out.detach(), **{f"d{n}": gr for n, gr in zip(names, grads)}, "stats": stats}


def _worker(rank: int, world: int, cases: list[Case], layout: str, rings: list[list[int]]) -> list[dict]:
    groups = [dist.new_group(ranks) for ranks in rings]  # every rank creates every group, in order
    ring = next(i for i, ranks in enumerate(rings) if rank in ranks)
    group, size = groups[ring], len(rings[ring])
    ring_rank = dist.get_rank(group)
    results = []
    for case in cases:
        token_index = [LAYOUTS[layout](case.seq, size, r) for r in range(size)]
        results.append(run_ring(case, token_index, ring_rank, group))
    return results


def assemble(case: Case, layout: str, per_rank: list[dict]) -> dict[str, torch.Tensor]:
    """Blocks of one ring back in true token order; the sinks' gradient summed over the ring."""
    x = case.inputs()
    full = {"out": torch.zeros_like(x["grad"]), "dq": torch.zeros_like(x["q"]),
            "dk": torch.zeros_like(x["k"]), "dv": torch.zeros_like(x["v"])}
    for r, res in enumerate(per_rank):
        idx = LAYOUTS[layout](case.seq, len(per_rank), r)
        full["out"][:, idx] = res["out"]
        for n in ("dq", "dk", "dv"):
            full[n][:, :, idx] = res[n]
    if case.sinks:
        full["dsinks"] = sum(res["dsinks"] for res in per_rank)
    return full


def check(case: Case, got: dict[str, torch.Tensor]) -> None:
    want = reference(case, case.inputs())
    assert_close_rel(got["out"], want["out"], name=f"{case.name}: output")
    for n in ("dq", "dk", "dv") + (("dsinks",) if case.sinks else ()):
        assert want[n].norm() > 0, f"{case.name}: reference {n} is zero, the test could not fail"
        assert_close_rel(got[n], want[n], name=f"{case.name}: {n}")
        assert abs(grad_ratio(got[n], want[n]) - 1) < 1e-5, f"{case.name}: {n} ratio {grad_ratio(got[n], want[n])}"


@pytest.fixture(scope="module")
def ring_runs():
    """Results of one fork per (world, rings, layout), computed on first use."""
    cache: dict = {}

    def get(layout: str, rings: list[list[int]]) -> list[dict]:
        key = (layout, tuple(map(tuple, rings)))
        if key not in cache:
            world = sum(map(len, rings))
            cache[key] = run_distributed(_worker, world, CASES, layout, rings)
        return cache[key]

    return get


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("ring", [2, 4])
def test_ring_attention_matches_dense(ring_runs, ring: int, layout: str, case: Case) -> None:
    results = ring_runs(layout, [list(range(ring))])
    i = CASES.index(case)
    check(case, assemble(case, layout, [results[r][i] for r in range(ring)]))


def test_ring_on_subgroups_uses_global_ranks(ring_runs) -> None:
    """Two rings of 2 on non-contiguous ranks of a world of 4: ring rank != global rank."""
    rings = [[0, 2], [1, 3]]
    results = ring_runs("zigzag", rings)
    for i, case in enumerate(CASES):
        if case.name in ("causal", "everything"):
            for ranks in rings:
                check(case, assemble(case, "zigzag", [results[r][i] for r in ranks]))


def test_ring_of_one_process_group(ring_runs) -> None:
    results = ring_runs("zigzag", [[0]])
    for i, case in enumerate(CASES):
        check(case, assemble(case, "zigzag", [results[0][i]]))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_ring_without_distributed(case: Case) -> None:
    """``group=None`` and no process group: a ring of one process."""
    assert not dist.is_initialized()
    check(case, run_ring(case, [torch.arange(case.seq)], 0, None))


def test_lower_precision_computes_in_float32() -> None:
    case = replace(CASES[-1], name="bf16")
    x = case.inputs()
    common = dict(group=None, metadata=case.metadata(), token_index=[torch.arange(case.seq)],
                  sliding_window=case.window, softcap=case.softcap)
    low = [x[n].to(torch.bfloat16).requires_grad_(True) for n in ("q", "k", "v", "sinks")]
    high = [t.detach().float().requires_grad_(True) for t in low]
    out_low = ring_attention(*low[:3], sinks=low[3], **common)
    out_high = ring_attention(*high[:3], sinks=high[3], **common)
    assert out_low.dtype == torch.bfloat16
    assert torch.equal(out_low, out_high.to(torch.bfloat16))
    grad = x["grad"].to(torch.bfloat16)
    g_low = torch.autograd.grad((out_low * grad).sum(), low)
    g_high = torch.autograd.grad(out_high, high, grad.float())
    for gl, gh in zip(g_low, g_high):
        assert gl.dtype == torch.bfloat16
        assert torch.equal(gl, gh.to(torch.bfloat16))


# -- layouts --------------------------------------------------------------------------------------


@pytest.mark.parametrize("ring", [1, 2, 4])
def test_layouts_partition_the_sequence(ring: int) -> None:
    seq = 8 * ring
    block = seq // (2 * ring)
    for fn in LAYOUTS.values():
        held = torch.cat([fn(seq, ring, r) for r in range(ring)])
        assert torch.equal(held.sort().values, torch.arange(seq))
    for j in range(ring):
        blocks = zigzag_indices(seq, ring, j).view(2, block)[:, 0] // block
        assert blocks.tolist() == [j, 2 * ring - 1 - j]
        assert torch.equal(contiguous_indices(seq, ring, j), torch.arange(j * 2 * block, (j + 1) * 2 * block))


def test_layout_errors_name_the_fix() -> None:
    with pytest.raises(ValueError, match="multiple of 2 \\* ring = 8.*pad the sequence to a multiple of 8"):
        zigzag_indices(36, 4, 0)
    with pytest.raises(ValueError, match="pad the sequence to a multiple of 4"):
        contiguous_indices(30, 4, 0)
    with pytest.raises(ValueError, match="outside the ring"):
        zigzag_indices(32, 4, 4)


def test_token_index_must_partition_the_sequence() -> None:
    case = CASES[0]
    x = case.inputs()
    with pytest.raises(ValueError, match="partition"):
        ring_attention(x["q"], x["k"], x["v"], group=None, metadata=case.metadata(),
                       token_index=[torch.arange(case.seq).flip(0).clamp(max=case.seq - 2)])


def test_image_blocks_are_refused_not_skipped() -> None:
    # a future key block may hold the rest of a query's image: the kernel refuses blocks rather than drop them
    case = CASES[0]
    x = case.inputs()
    meta = case.metadata()
    meta.blocks = torch.zeros(meta.batch_size, meta.seq_len, dtype=torch.long)
    with pytest.raises(ValueError, match="bidirectional blocks .* not supported across ring ranks.*ring=1"):
        ring_attention(x["q"], x["k"], x["v"], group=None, metadata=meta, token_index=[torch.arange(case.seq)])


# -- skipped work -----------------------------------------------------------------------------------

STATS_CASES = [
    Case("stats_causal"),
    Case("stats_packed", packs=((8, 8, 16), (4, 12, 16))),
    Case("stats_window", window=3),
    Case("stats_window_non_causal", causal=False, window=3),
    # runs of 4 tokens: a query run starts exactly 5 after a key run ends, the first distance out of the window
    Case("stats_window_boundary", window=5),
    Case("stats_window_boundary_non_causal", causal=False, window=5),
    Case("stats_non_causal_packed", causal=False, packs=((8, 8, 16), (4, 12, 16))),
]
STATS_RING = 4


def _runs(index: list[int], cap: int) -> list[list[int]]:
    """The kernel's runs: each half of the block, split where indices stop being consecutive and
    every ``cap`` tokens."""
    half = (len(index) + 1) // 2
    runs = []
    for part in (index[:half], index[half:]):
        for i, t in enumerate(part):
            if i == 0 or t != part[i - 1] + 1 or len(runs[-1]) == cap:
                runs.append([])
            runs[-1].append(t)
    return runs


def expected_stats(case: Case, layout: str, rank: int, ring: int = STATS_RING, cap: int | None = None) -> RingStats:
    """Brute force from the dense mask: a (query run, key run) pair must be computed iff some row
    allows some of its entries, and needs a mask iff some entry is forbidden."""
    cap = ring_module.MAX_RUN_CPU if cap is None else cap
    allowed = case.metadata().dense_mask(case.window, case.causal)[:, 0]
    q_runs = _runs(LAYOUTS[layout](case.seq, ring, rank).tolist(), cap)
    stats = RingStats()
    for owner in range(ring):
        for qr in q_runs:
            for kr in _runs(LAYOUTS[layout](case.seq, ring, owner).tolist(), cap):
                sub = allowed[:, qr][:, :, kr]
                if not sub.any():
                    stats.skipped_pairs += 1
                    continue
                stats.computed_pairs += 1
                stats.masked_pairs += int(not sub.all())
                stats.scores_computed += B * HQ * len(qr) * len(kr)
    return stats


def _stats_worker(rank: int, world: int) -> dict:
    out = {}
    for layout in LAYOUTS:
        for case in STATS_CASES:
            token_index = [LAYOUTS[layout](case.seq, world, r) for r in range(world)]
            x = case.inputs()
            idx = token_index[rank]
            with record_ring_stats() as stats:
                ring_attention(x["q"][:, :, idx], x["k"][:, :, idx], x["v"][:, :, idx], group=dist.group.WORLD,
                               metadata=case.metadata(), token_index=token_index, causal=case.causal,
                               sliding_window=case.window)
            out[layout, case.name] = stats
    return out


@pytest.fixture(scope="module")
def stats_runs() -> list[dict]:
    return run_distributed(_stats_worker, STATS_RING)


@pytest.mark.parametrize("case", STATS_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_pairs_that_cannot_interact_are_skipped(stats_runs, layout: str, case: Case) -> None:
    for rank in range(STATS_RING):
        got = stats_runs[rank][layout, case.name]
        assert got == expected_stats(case, layout, rank), f"rank {rank}"
    skipped = sum(stats_runs[r][layout, case.name].skipped_pairs for r in range(STATS_RING))
    assert skipped > 0  # every one of these patterns has pairs that cannot interact


def test_zigzag_balances_causal_work(stats_runs) -> None:
    zigzag = [stats_runs[r]["zigzag", "stats_causal"].scores_computed for r in range(STATS_RING)]
    contiguous = [stats_runs[r]["contiguous", "stats_causal"].scores_computed for r in range(STATS_RING)]
    assert len(set(zigzag)) == 1, zigzag
    assert sum(zigzag) == sum(contiguous)
    assert contiguous == sorted(contiguous) and contiguous[0] < contiguous[-1], contiguous  # later ranks see more past
    plain = [stats_runs[r]["zigzag", "stats_causal"].skipped_pairs for r in range(STATS_RING)]
    packed = [stats_runs[r]["zigzag", "stats_packed"].skipped_pairs for r in range(STATS_RING)]
    assert sum(packed) > sum(plain)


def test_stats_are_not_recorded_outside_the_block() -> None:
    case = CASES[0]
    x = case.inputs()
    kwargs = dict(group=None, metadata=case.metadata(), token_index=[torch.arange(case.seq)])
    with record_ring_stats() as stats:
        ring_attention(x["q"], x["k"], x["v"], **kwargs)
    before = replace(stats)
    assert before == expected_stats(case, "contiguous", 0, ring=1)
    assert before.skipped_pairs == 1  # the upper quarter of the causal square
    ring_attention(x["q"], x["k"], x["v"], **kwargs)
    assert stats == before


CAP = 3  # runs of 4 tokens become 3 + 1: several pairs per run, uneven


def _capped_worker(rank: int, world: int) -> tuple[list[dict], dict]:
    ring_module.MAX_RUN_CPU = CAP  # this forked process only
    return _worker(rank, world, CASES, "zigzag", [list(range(world))]), _stats_worker(rank, world)


def test_runs_longer_than_max_run_are_cut() -> None:
    """With runs cut every ``MAX_RUN_CPU`` tokens the results stay exact, every pair that cannot
    interact is skipped, and zigzag stays balanced."""
    assert CAP < 32 // (2 * STATS_RING) < ring_module.MAX_RUN_CPU
    results = run_distributed(_capped_worker, STATS_RING)
    for i, case in enumerate(CASES):
        check(case, assemble(case, "zigzag", [results[r][0][i] for r in range(STATS_RING)]))
    for layout in LAYOUTS:
        for case in STATS_CASES:
            for rank in range(STATS_RING):
                got = results[rank][1][layout, case.name]
                assert got == expected_stats(case, layout, rank, cap=CAP), f"{layout} {case.name} rank {rank}"
    zigzag = [results[r][1]["zigzag", "stats_causal"] for r in range(STATS_RING)]
    assert len({z.scores_computed for z in zigzag}) == 1
    default = expected_stats(STATS_CASES[0], "zigzag", 0)
    assert zigzag[0].computed_pairs > default.computed_pairs  # the cap did cut the runs

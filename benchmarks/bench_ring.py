"""Ulysses × ring at equal ``sp``: bytes each rank sends per attention layer, and measured step time.

Part 1 (modelled, per attention layer and rank, forward + backward, one direction = what a rank sends),
for an SP group of ``sp = ulysses × ring`` ranks, sequence ``s``, head dim ``d``, ``Hq`` query and
``Hkv`` KV heads, ``b`` bytes per element::

    Ulysses all-to-alls  = 2 · (u-1)/u · (s/sp) · d · (2·Hq + 2·Hkv_eff)         (fwd: Q,K,V in, O out; bwd: the inverse)
    ring passes          = (r-1) · (s/r) · d · 2·Hkv_u            forward: K and V blocks, r-1 hops
                         + (r-1) · (s/r) · d · 2·Hkv_u            backward: K and V again ...
                         +  r    · (s/r) · d · 2·Hkv_u            ... and their gradient accumulators, r hops
    Hkv_eff = max(Hkv, u),  Hkv_u = Hkv_eff / u                   (KV heads per rank after the exchange)
    zigzag relayout      = 2 · (s/r) · d · (2·Hq_u + 2·Hkv_u) · (sent share)   (ring_layout="zigzag", causal layers:
                                                                    Q,K,V in, O back, fwd; their gradients, bwd)
    the sent share: the fraction of its two halves the busiest ring rank sends (1 for most ranks; a
    rank keeps a half only where the contiguous and zigzag layouts agree on it).

The cross-node part models ``--nodes`` nodes of ``--per-node`` devices at ``sp = nodes × per_node``
(ranks numbered node by node): an all-to-all over a Ulysses group that spans nodes sends the
off-node share of its bytes over the network; a ring hop crosses the network when its two ranks are
on different nodes, and every block crosses every hop, so the busiest off-node link carries the
ring's whole traffic.

Part 2 (measured, CPU, gloo, in one run): forward + backward of a small Llama on ``--world`` processes
for every split of ``sp = world``, median over ``--repeats``, slowest rank; ratios against pure
Ulysses. On a 2-core machine the processes share the cores, so the ratios say what the extra compute
and exchanges cost relative to each other, not what a GPU cluster would see.
"""

from __future__ import annotations

import argparse
import statistics
import time

from _common import launch, llama, machine, table  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def modelled_bytes(s: int, sp: int, u: int, hq: int, hkv: int, d: int, elem: int) -> dict[str, float]:
    """Bytes one rank sends per attention layer (forward + backward) for the split ``sp = u × r``."""
    r = sp // u
    hkv_eff = max(hkv, u)
    a2a = 2 * (u - 1) / u * (s / sp) * d * (2 * hq + 2 * hkv_eff) * elem
    block = (s / r) * d * 2 * (hkv_eff / u) * elem
    ring = ((r - 1) * block * 2 + r * block) if r > 1 else 0.0
    return {"all_to_all": a2a, "ring": ring, "total": a2a + ring}


def zigzag_bytes(s: int, sp: int, u: int, hq: int, hkv: int, d: int, elem: int) -> float:
    """Bytes the busiest ring rank sends per causal attention layer (fwd + bwd) to re-lay its ring block
    out zigzag and back (``ring_layout="zigzag"``; 0 without a ring)."""
    from lightning_ulysses.parallel.zigzag import contiguous_halves, zigzag_halves

    r = sp // u
    if r == 1:
        return 0.0
    hkv_eff = max(hkv, u)
    have, want = contiguous_halves(r), zigzag_halves(r)
    share = max(sum(h not in want[j] for h in have[j]) for j in range(r)) / 2
    per_direction = (s / r) * d * (2 * hq / u + 2 * hkv_eff / u) * elem * share  # Q, K, V (or dQ, dK, dV) + O (dO)
    return 2 * per_direction


def cross_node_bytes(s: int, nodes: int, per_node: int, u: int, hq: int, hkv: int, d: int,
                     elem: int) -> dict[str, float]:
    """Bytes per attention layer that cross nodes on the busiest rank / link, at ``sp = nodes × per_node``."""
    sp = nodes * per_node
    r = sp // u
    hkv_eff = max(hkv, u)
    node = [rank // per_node for rank in range(sp)]
    # all-to-all: a rank sends an equal share to each Ulysses peer; the off-node peers' shares cross
    a2a_total = 2 * (s / sp) * d * (2 * hq + 2 * hkv_eff) * elem / u  # per peer
    a2a = max(sum(a2a_total for p in range(g, g + u) if node[p] != node[rank])
              for g in range(0, sp, u) for rank in range(g, g + u))
    # ring hops: ring rank j (SP ranks j*u + i) sends to ring rank j+1; count hops that change node
    block = (s / r) * d * 2 * (hkv_eff / u) * elem
    hops_crossing = sum(1 for i in range(u) for j in range(r) if node[j * u + i] != node[((j + 1) % r) * u + i])
    per_hop = ((r - 1) * 2 + r) * block / r if r > 1 else 0.0  # every hop carries 1/r of the passes
    ring_link = per_hop * r if hops_crossing else 0.0  # the busiest crossing link sees every block
    return {"all_to_all": a2a, "ring_link": ring_link, "crossing_hops": hops_crossing}


def _time_split(rank: int, world: int, u: int, args: argparse.Namespace, layout: str = "zigzag") -> float:
    from lightning_ulysses import apply_ulysses
    from lightning_ulysses.parallel.mesh import build_mesh

    dims = build_mesh("cpu", world).split(u)
    model = llama(hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads)
    groups = {"ring_group": dims.ring_group, "ulysses_group": dims.ulysses_group} if dims.ring_size > 1 else {}
    handle = apply_ulysses(model, dims.sp_group, ring_layout=layout, **groups)
    n = args.seq // world
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1024, (1, args.seq), generator=g)[:, rank * n:(rank + 1) * n]
    times = []
    for i in range(args.warmup + args.repeats):
        dist.barrier()
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        elapsed = torch.tensor(time.perf_counter() - start)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if i >= args.warmup:
            times.append(elapsed.item())
        model.zero_grad(set_to_none=True)
    handle.remove()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-model", type=int, default=131072, help="sequence of the modelled tables")
    parser.add_argument("--model-heads", type=int, nargs=3, default=[32, 8, 128], metavar=("HQ", "HKV", "D"))
    parser.add_argument("--bytes", type=int, default=2, help="bytes per element (bf16: 2)")
    parser.add_argument("--sp-model", type=int, default=16)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--per-node", type=int, default=8)
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-measure", action="store_true")
    args = parser.parse_args()
    print(machine())
    hq, hkv, d = args.model_heads
    s, sp, elem = args.seq_model, args.sp_model, args.bytes
    mib = 2**20
    print(f"\n## Bytes per attention layer and rank, fwd + bwd (s={s}, Hq={hq}, Hkv={hkv}, d={d}, {elem} B, sp={sp})\n")
    rows = []
    base = None
    for u in sorted((u for u in _divisors(sp) if u <= hq and (hq % u == 0)), reverse=True):
        b = modelled_bytes(s, sp, u, hq, hkv, d, elem)
        base = base or b["total"]
        z = zigzag_bytes(s, sp, u, hq, hkv, d, elem)
        rows.append([f"{u} x {sp // u}", f"{b['all_to_all'] / mib:.1f}", f"{b['ring'] / mib:.1f}",
                     f"{b['total'] / mib:.1f}", f"{b['total'] / base:.2f}", f"{z / mib:.1f}"])
    print(table(["ulysses x ring", "all-to-all MiB", "ring MiB", "total MiB", "vs pure Ulysses",
                 "+ zigzag relayout MiB (causal layers)"], rows))

    nodes, per = args.nodes, args.per_node
    print(f"\n## Cross-node bytes per attention layer, {nodes} nodes x {per} devices, sp={nodes * per}\n")
    rows = []
    for u in sorted((u for u in _divisors(nodes * per) if hq % u == 0), reverse=True):
        c = cross_node_bytes(s, nodes, per, u, hq, hkv, d, elem)
        rows.append([f"{u} x {nodes * per // u}", f"{c['all_to_all'] / mib:.1f}", f"{c['ring_link'] / mib:.1f}",
                     str(c["crossing_hops"])])
    print(table(["ulysses x ring", "all-to-all off-node MiB (busiest rank)", "ring MiB on the busiest off-node link",
                 "ring hops crossing nodes"], rows))

    if args.skip_measure:
        return
    world = args.world
    print(f"\n## Measured forward + backward, {world} processes, seq {args.seq}, Llama {args.heads}/{args.kv_heads} "
          f"heads, hidden {args.hidden}, {args.layers} layers (median of {args.repeats}, slowest rank)\n")
    rows = []
    base_t = None
    for u in sorted((u for u in _divisors(world) if args.heads % u == 0), reverse=True):
        layouts = ("zigzag", "contiguous") if world // u > 1 else ("zigzag",)  # no ring: nothing to re-lay
        for layout in layouts:
            print(f"  timing ulysses={u} x ring={world // u} ({layout}) ...", flush=True)
            t = launch(_time_split, world, u, args, layout)[0]
            base_t = base_t or t
            rows.append([f"{u} x {world // u}", layout if world // u > 1 else "-", f"{t * 1e3:.0f}",
                         f"{t / base_t:.2f}"])
    print(table(["ulysses x ring", "ring layout", "step ms", "vs pure Ulysses"], rows))


if __name__ == "__main__":
    main()

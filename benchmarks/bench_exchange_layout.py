"""Copies around the Ulysses exchange: zero-copy receive views vs copying each received tensor.

``heads_from_sequence`` lays out its send buffer in the projections' physical ``[b, s/sp, H, d]``
order so that, for batch 1, the received Q/K/V are views of the receive buffer. This measures the
exchange + sdpa + backward with those views against the same with a ``.contiguous()`` copy of each
received tensor (what a ``[b, H, s/sp, d]``-ordered buffer costs), interleaved in one run.

    python benchmarks/bench_exchange_layout.py [--seq 8192] [--sp 2] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_ulysses.parallel.comm import heads_from_sequence, sequence_from_heads  # noqa: E402
from tests.distributed import run_distributed  # noqa: E402


def _step(q, k, v, group, copy):
    qh, kh, vh = heads_from_sequence([q, k, v], group)
    if copy:
        qh, kh, vh = qh.contiguous(), kh.contiguous(), vh.contiguous()
    out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=True)
    sequence_from_heads(out.transpose(1, 2), group).sum().backward()


def _worker(rank, world, seq, heads, kv, d, repeats):
    torch.manual_seed(rank)
    s = seq // world
    # HF's projections give [b, s, H, d] memory viewed as [b, H, s, d]
    mk = lambda h: torch.randn(1, s, h, d).transpose(1, 2).requires_grad_()  # noqa: E731
    q, k, v = mk(heads), mk(kv), mk(kv)
    times = {False: [], True: []}
    for i in range(repeats + 1):
        for copy in (False, True):
            dist.barrier()
            t = time.perf_counter()
            _step(q, k, v, dist.group.WORLD, copy)
            if i:  # first round is warm-up
                times[copy].append(time.perf_counter() - t)
        if rank == 0:  # progress: a round takes seconds at the default length, the whole run about a minute
            done = "warm-up" if i == 0 else f"views {times[False][-1]:.3f} s, copies {times[True][-1]:.3f} s"
            print(f"  round {i}/{repeats} ({done})", file=sys.stderr, flush=True)
    return {c: statistics.median(t) for c, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--sp", type=int, default=2)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    a = parser.parse_args()
    print(f"bench_exchange_layout: seq {a.seq}, sp {a.sp}: 1 warm-up + {a.repeats} rounds of (views, copies) on "
          f"{a.sp} processes", file=sys.stderr, flush=True)
    res = run_distributed(_worker, a.sp, a.seq, a.heads, a.kv_heads, a.head_dim, a.repeats, timeout=1200)[0]
    print(f"\nexchange + sdpa + backward, batch 1, seq {a.seq}, sp {a.sp}, {a.heads}/{a.kv_heads} heads, "
          f"head_dim {a.head_dim}, median of {a.repeats} (rank 0)\n")
    print("| receive | time s | ratio |")
    print("|---|---|---|")
    print(f"| views (current) | {res[False]:.4f} | 1.00 |")
    print(f"| copy each received tensor | {res[True]:.4f} | {res[True] / res[False]:.2f} |")


if __name__ == "__main__":
    main()

"""Where a Ulysses training step spends its time: all-to-all, attention, the rest (torch profiler).

One training step (forward + backward, after ``--warmup`` unprofiled steps) of the small GQA Llama of
``bench_step.py`` runs with ``apply_ulysses`` on ``sp`` gloo processes under
``torch.profiler.profile`` (CPU activity, no shapes). Time is attributed on each rank's main thread:

* **all-to-all fwd**: the ``ulysses/all_to_all`` ranges (``lightning_ulysses.parallel.comm``): the exchange
  including waiting for the slowest peer (the copies that pack the send buffers count as rest);
* **all-to-all bwd**: the autograd nodes of the inverse exchanges
  (``autograd::engine::evaluate_function: ...all_to_all_single...Backward``): the library's
  ``record_function`` ranges cover the forward only;
* with ``--overlap-chunks N`` the exchanges run asynchronously: all-to-all is then the time this
  rank's main thread spends *starting* exchanges and *blocked waiting* for them
  (``ulysses/all_to_all/launch`` and ``.../wait``, forward and backward), i.e. the part of the
  communication that compute did not hide;
* **attention fwd**: the ``ulysses/attention/<backend>`` ranges (the backend on the full sequence);
* **attention bwd**: the autograd nodes of the attention kernel (``ScaledDotProduct...Backward`` for sdpa;
  for eager there is no single kernel and this column stays 0);
* **rest** = step - all of the above (projections, MLP, norms, RoPE, embeddings, loss, metadata gather,
  optimizer-free backward of those, profiler overhead).

Shares are per rank, then averaged over the ranks (the min-max over ranks is shown for the all-to-all).
The step time is the wall time of the profiled step on that rank (profiling adds some overhead).

On CPU/gloo the all-to-all is a memcpy-like path through loopback TCP / shared memory driven by
CPU threads that compete with compute for the same cores, and the attention kernel is a CPU flash
kernel: the split is not the one of NCCL on GPUs (NVLink all-to-all, where communication is a smaller
share and can overlap compute) — use it to compare configurations on this machine, not to predict GPUs.

    python benchmarks/bench_profile.py                     # seq 4096, sp 2 4: ~1 min on 2 cores
    python benchmarks/bench_profile.py --seq 8192 --sp 2 --steps 3
    python benchmarks/bench_profile.py --overlap-chunks 1 2      # exposed all-to-all without / with overlap
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import _common
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from lightning_ulysses import apply_ulysses
from lightning_ulysses.parallel.comm import LAUNCH_LABEL, PROFILE_LABEL, WAIT_LABEL
from lightning_ulysses.lightning.data import shard_batch
from lightning_ulysses.parallel.mesh import build_mesh

ATTN_LABEL = "ulysses/attention/"
ENGINE = "autograd::engine::evaluate_function: "
ATTN_BACKWARD_NODES = ("ScaledDotProduct", "FlashAttention", "EfficientAttention", "CudnnAttention",
                       "FlexAttention")


def _is_top(event, labels) -> bool:
    """No ancestor of ``event`` matches (so nested ranges are not counted twice)."""
    parent = event.cpu_parent
    while parent is not None:
        if labels(parent.name):
            return False
        parent = parent.cpu_parent
    return True


def _classify(name: str) -> str | None:
    if name == PROFILE_LABEL:
        return "a2a_fwd"
    if name in (LAUNCH_LABEL, WAIT_LABEL):
        return "a2a_async"  # forward or backward: decided by the ancestors (see _kind)
    if name.startswith(ATTN_LABEL):
        return "attn_fwd"
    if name.startswith(ENGINE):
        node = name[len(ENGINE):]
        if "all_to_all" in node:
            return "a2a_bwd"
        if any(key in node for key in ATTN_BACKWARD_NODES):
            return "attn_bwd"
    return None


def _kind(event) -> str | None:
    kind = _classify(event.name)
    if kind != "a2a_async":
        return kind
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(ENGINE):
            return "a2a_bwd"
        parent = parent.cpu_parent
    return "a2a_fwd"


def _worker(rank: int, world: int, cfg: dict, seq: int, warmup: int, steps: int, chunks: int) -> list[dict]:
    dims = build_mesh("cpu", world)
    model = _common.llama(**cfg)
    model.train()
    apply_ulysses(model, dims.sp_group, overlap_chunks=chunks)
    batch = shard_batch(_common.full_batch(seq, cfg["vocab"]), dims.sp_rank, world)
    for _ in range(warmup):
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
    out = []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        dist.barrier()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            model(**batch).loss.backward()
            step = time.perf_counter() - t0
        split = {"a2a_fwd": 0.0, "a2a_bwd": 0.0, "attn_fwd": 0.0, "attn_bwd": 0.0}
        counts = dict.fromkeys(split, 0)
        for event in prof.events():
            kind = _kind(event)
            if kind is None or not _is_top(event, lambda n: _classify(n) is not None):
                continue
            split[kind] += event.cpu_time_total / 1e6  # us -> s (wall time of the range on this thread)
            counts[kind] += 1
        out.append({"step": step, **split, "counts": counts})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--sp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=1, help="profiled steps (shares averaged)")
    parser.add_argument("--overlap-chunks", type=int, nargs="+", default=[1],
                        help="apply_ulysses(overlap_chunks=...) values to profile, one row each")
    _common.add_model_args(parser)
    args = parser.parse_args()
    t_start = time.perf_counter()

    cfg = _common.model_config(args)
    print(f"# bench_profile: {_common.machine()}")
    print(f"model: Llama hidden {args.hidden}, {args.layers} layers, {args.heads}/{args.kv_heads} heads, intermediate "
          f"{args.intermediate}, vocab {args.vocab}, float32, sdpa; seq {args.seq}, batch 1; "
          f"{args.threads_per_process} torch thread(s) per process; {args.steps} profiled step(s) after "
          f"{args.warmup} warm-up")
    rows = []
    for sp, chunks in [(sp, c) for sp in args.sp for c in args.overlap_chunks]:
        per_rank = _common.launch(_worker, sp, cfg, args.seq, args.warmup, args.steps, chunks,
                                  threads=args.threads_per_process)
        shares = {k: [] for k in ("a2a_fwd", "a2a_bwd", "attn_fwd", "attn_bwd", "rest", "a2a")}
        steps = []
        for rank_steps in per_rank:
            for r in rank_steps:
                a2a = r["a2a_fwd"] + r["a2a_bwd"]
                attn = r["attn_fwd"] + r["attn_bwd"]
                for k in ("a2a_fwd", "a2a_bwd", "attn_fwd", "attn_bwd"):
                    shares[k].append(r[k] / r["step"])
                shares["a2a"].append(a2a / r["step"])
                shares["rest"].append((r["step"] - a2a - attn) / r["step"])
                steps.append(r["step"])
        c = per_rank[0][0]["counts"]
        pct = {k: statistics.mean(v) * 100 for k, v in shares.items()}
        rows.append([
            args.seq, sp, chunks, f"{statistics.median(steps):.2f}",
            f"{pct['a2a']:.1f}% ({min(shares['a2a']) * 100:.1f}-{max(shares['a2a']) * 100:.1f})",
            f"{pct['a2a_fwd']:.1f}% / {pct['a2a_bwd']:.1f}%",
            f"{pct['attn_fwd'] + pct['attn_bwd']:.1f}%", f"{pct['attn_fwd']:.1f}% / {pct['attn_bwd']:.1f}%",
            f"{pct['rest']:.1f}%",
            f"{c['a2a_fwd']}+{c['a2a_bwd']} / {c['attn_fwd']}+{c['attn_bwd']}",
        ])
        print(f"  sp {sp} overlap_chunks {chunks}: {per_rank}", file=sys.stderr, flush=True)
    print()
    print(_common.table(["seq", "sp", "overlap chunks", "step s", "all-to-all (min-max over ranks)", "a2a fwd / bwd", "attention",
                         "attn fwd / bwd", "rest", "ranges counted: a2a fwd+bwd / attn fwd+bwd (rank 0)"], rows))
    print()
    print("Shares of the profiled step's wall time, mean over ranks. With overlap chunks > 1 the all-to-all "
          "columns are the time spent starting and blocked waiting for exchanges (what compute did not hide). NOTE: on CPU/gloo the all-to-all is a "
          "memcpy-like path on the same cores as the compute and attention is a CPU flash kernel, so this split "
          "differs from NCCL on GPUs; compare configurations on this machine only.")
    print(f"total runtime {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()

"""Per-rank peak memory of a training step under Ulysses SP and ALST-style tricks, and the longest
sequence that fits a per-rank memory budget.

Configurations (each at sp = 1, 2, 4; sp = 1 is the plain model in one process, i.e. what one rank of
plain DDP holds, since DDP does not split the sequence):

* ``plain``: the model as is (``apply_ulysses`` when sp > 1);
* ``tiled``: + ``apply_tiled_loss`` (no ``[s, vocab]`` logits) and ``tile_mlps`` (MLP tile by tile);
* ``ckpt-offload``: + ``checkpoint_decoder_layers(model, offload=True)``;
* ``tiled+ckpt-offload``: both (the ALST recipe).

Memory per rank (``peak``) = parameters + everything one forward + backward allocates on top of them
(gradients, activations, temporaries). On CPU the step's part is the growth of the peak resident set
(``VmHWM``, reset with ``/proc/self/clear_refs`` after setup) over the resident set after setup, with
glibc told to ``mmap`` every block >= 128 KiB (``mallopt``) so freed tensors leave the RSS, as in
``bench_tiled.py``; with ``--device cuda`` it is ``torch.cuda.max_memory_allocated()``. Every case runs
in fresh processes (forked from a parent that only imported the libraries), so peaks do not leak
between cases. A case fits the budget when ``peak <= --budget``.

On CPU, "offload" moves the checkpointed layer inputs from host memory to host memory: it cannot save
anything there, so the ``ckpt-offload`` rows measure activation checkpointing (plus the copy). Use
``--device cuda`` to see offloading.

The search (second table): from the sequence of the first table, double (or halve) until the case
stops (starts) fitting or the cap (``--max-local-seq`` tokens per rank) is reached, then bisect until
the bracket is within ``--tolerance``; the largest fitting length found is reported (the true maximum
is below the failing one). Lengths are multiples of ``--granule * sp``. A row that fits at the cap is
reported as ``>= cap`` (a lower bound), and every row also gets a linear extrapolation to the budget
from its two longest measured lengths (the cap and half of it for rows that fit there).

``--debug-skip-attention`` searches the tiled configurations with ``apply_ulysses(...,
debug_skip_attention=True)``: every attention layer but the last skips its O(s^2) computation (the
exchanges still run; a skipped layer keeps what a linear-memory kernel keeps for backward, and the
last layer still allocates attention's transient memory), so their limit is
measured up to ``--debug-max-local-seq`` tokens per rank instead of extrapolated from the CPU cap.
Only the search uses it; the fixed-length table always runs real attention.

    python benchmarks/bench_memory.py            # all four configurations searched: ~15 min on 2 cores
    python benchmarks/bench_memory.py --quick    # search plain and tiled+ckpt-offload only: ~8 min
    python benchmarks/bench_memory.py --configs tiled+ckpt-offload --sp 4 --debug-skip-attention
    python benchmarks/bench_memory.py --device cuda --budget 70 --max-local-seq 262144 --hidden 4096
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import sys
import time
from pathlib import Path

import _common
import torch
import torch.distributed as dist

from lightning_ulysses import apply_ulysses
from lightning_ulysses.lightning.activation_checkpointing import checkpoint_decoder_layers
from lightning_ulysses.lightning.data import shard_batch
from lightning_ulysses.losses.tiled_hf_loss import apply_tiled_loss
from lightning_ulysses.tiling import tile_mlps

CONFIGS = {
    "plain": (False, False),
    "tiled": (True, False),
    "ckpt-offload": (False, True),
    "tiled+ckpt-offload": (True, True),
}
MIB = 2**20


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _cpu_reset_peak() -> int:
    """Free what can be freed, reset the peak RSS, and return the current RSS in bytes."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # pragma: no cover - non-glibc
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (the peak RSS) to the current RSS
    return _status_kib("VmRSS") * 1024


def _worker(rank: int, world: int, spec: dict) -> dict:
    device = spec["device"]
    if device == "cpu":
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD (fixed, no dynamic raise)
            libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
        except OSError:  # pragma: no cover
            pass
    else:
        torch.cuda.set_device(rank)
    tiled, ckpt = CONFIGS[spec["config"]]
    model = _common.llama(**spec["model"]).to(device)
    model.train()
    group = dist.group.WORLD
    if world > 1 or spec["debug"]:  # the debug mode lives in the Ulysses attention (sp = 1 included)
        apply_ulysses(model, group, debug_skip_attention=spec["debug"])
    if tiled:
        apply_tiled_loss(model, tile_bytes=spec["tile_bytes"])
        tile_mlps(model, group=group)
    if ckpt:
        checkpoint_decoder_layers(model, offload=True)
    params = sum(p.numel() * p.element_size() for p in model.parameters())

    def step(seq: int) -> None:
        batch = shard_batch(_common.full_batch(seq, spec["model"]["vocab"]), rank, world)
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        model(**batch).loss.backward()

    step(8 * world)  # tiny warm-up: kernels, lazy state, without raising the peak of the real steps
    out = []
    for seq in spec["seqs"]:  # ascending, so a later step's peak is never an earlier step's leftover
        model.zero_grad(set_to_none=True)
        if device == "cpu":
            base = _cpu_reset_peak()
        else:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        step(seq)
        elapsed = time.perf_counter() - t0
        if device == "cpu":
            growth = _status_kib("VmHWM") * 1024 - base
            # what the step holds above the parameters; the rest of ``base`` is the interpreter and libraries
            peak = params + growth
        else:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            growth = peak - base
        out.append({"seq": seq, "peak": peak, "growth": growth, "params": params, "time": elapsed})
    return out


def debug_search(args, config: str) -> bool:
    """Whether ``config``'s longest sequence is searched with attention skipped in all but the last layer."""
    return args.debug_skip_attention and CONFIGS[config][0]


def run_case(args, config: str, sp: int, seqs: list[int], debug: bool = False) -> list[dict]:
    """Per-rank peak of one forward+backward at each of ``seqs`` (one process group): the max over the ranks."""
    spec = {"device": args.device, "config": config, "seqs": sorted(seqs), "model": args.model,
            "tile_bytes": int(args.loss_tile_mib * MIB), "debug": debug}
    backend = "gloo" if args.device == "cpu" else "nccl"
    res = _common.launch(_worker, sp, spec, threads=args.threads_per_process, backend=backend)
    return [{**max((r[i] for r in res), key=lambda x: x["peak"]), "time": max(r[i]["time"] for r in res)}
            for i in range(len(seqs))]


def search(args, config: str, sp: int, start: int, start_peak: int, log) -> dict:
    """The longest fitting length: doubling (or halving) from ``start``, then coarse bisection.

    Lengths are multiples of ``granule * sp`` and at most ``cap = max_local_seq * sp``; the cap is probed
    first when ``start`` fits (the tiled configurations usually fit there: one probe instead of a doubling
    series). Returns ``lo`` (longest fitting length found, ``None`` if none), ``hi`` (shortest failing one,
    ``None`` if the cap fits), the probe count and every measured ``(seq, peak)``.
    """
    budget = args.budget * 2**30
    g = args.granule * sp
    debug = debug_search(args, config)
    cap = max(g, (args.debug_max_local_seq if debug else args.max_local_seq) * sp // g * g)
    points = [(start, start_peak)]

    def fits(s: int) -> bool:
        r = run_case(args, config, sp, [s], debug=debug)[0]
        points.append((s, r["peak"]))
        log(f"    {config} sp {sp}: seq {s} peak {r['peak'] / MIB:.0f} MiB ({r['time']:.0f} s)")
        return r["peak"] <= budget

    def result(lo, hi):
        return {"lo": lo, "hi": hi, "cap": cap, "probes": len(points) - 1, "points": points}

    if start_peak <= budget:
        lo, hi = start, None
        if lo >= cap:
            return result(lo, None)
        if fits(cap):
            half = cap // 2 // g * g
            if half > lo:  # a second point in the linear region for the extrapolation
                fits(half)
            return result(cap, None)
        hi = cap
        s = lo * 2 // g * g
        while s < hi:  # doubling below the failing cap
            if not fits(s):
                hi = s
                break
            lo, s = s, s * 2 // g * g
    else:
        lo, hi = None, start
        while lo is None:  # halving
            s = hi // 2 // g * g
            if s < g:
                return result(None, hi)
            if fits(s):
                lo = s
            else:
                hi = s
    while hi / lo > 1 + args.tolerance:  # coarse bisection
        s = (lo + hi) // 2 // g * g
        if s in (lo, hi):
            break
        if fits(s):
            lo = s
        else:
            hi = s
    return result(lo, hi)


def linear_estimate(points: list[tuple[int, int]], budget: float) -> tuple[float, float, float | None]:
    """Least-squares ``peak = a + b * seq`` over the measured points; returns ``a``, ``b``, ``(budget - a) / b``."""
    n = len(points)
    if n < 2 or len({s for s, _ in points}) < 2:
        return float("nan"), float("nan"), None
    ms = sum(s for s, _ in points) / n
    mp = sum(p for _, p in points) / n
    b = sum((s - ms) * (p - mp) for s, p in points) / sum((s - ms) ** 2 for s, _ in points)
    a = mp - b * ms
    return a, b, ((budget - a) / b if b > 0 else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--seq", type=int, default=1024, help="sequence length of the fixed-length table")
    parser.add_argument("--sp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--search-configs", nargs="*", default=None, choices=list(CONFIGS),
                        help="configurations whose longest sequence is searched by measurement (default: all; "
                             "--quick: plain and tiled+ckpt-offload; give none to skip the search)")
    parser.add_argument("--budget", type=float, default=2.0, help="GiB per rank")
    parser.add_argument("--max-local-seq", type=int, default=2048,
                        help="search cap in tokens per rank (cap = this * sp): compute on CPU is slow")
    parser.add_argument("--debug-skip-attention", action="store_true",
                        help="search the tiled configurations with attention skipped in all but the last layer "
                             "(apply_ulysses debug mode): measured up to --debug-max-local-seq, not extrapolated")
    parser.add_argument("--debug-max-local-seq", type=int, default=16384,
                        help="search cap in tokens per rank for the --debug-skip-attention searches")
    parser.add_argument("--granule", type=int, default=128, help="searched lengths are multiples of granule * sp")
    parser.add_argument("--tolerance", type=float, default=0.25, help="stop bisecting when fail/fit <= 1 + tol")
    parser.add_argument("--quick", action="store_true", help="search only plain and tiled+ckpt-offload, with a 50%% tolerance")
    parser.add_argument("--loss-tile-mib", type=float, default=32,
                        help="apply_tiled_loss tile_bytes (float32 logits per tile; library default 256)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=None, help="default hidden / heads")
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=128256, help="default: Llama 3's")
    parser.add_argument("--threads-per-process", type=int, default=1)
    parser.add_argument("--plot-dir", default=None,
                        help="also write memory_limits.png here (peak vs seq and sp, limit vs sp; needs the plots extra)")
    args = parser.parse_args()
    if args.search_configs is None:
        args.search_configs = ["plain", "tiled+ckpt-offload"] if args.quick else list(CONFIGS)
    if args.quick:
        args.tolerance = max(args.tolerance, 0.5)
    args.search_configs = [c for c in args.search_configs if c in args.configs]
    args.model = dict(hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                      head_dim=args.head_dim, intermediate=args.intermediate, vocab=args.vocab)
    budget = args.budget * 2**30
    t_start = time.perf_counter()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    print(f"# bench_memory: {_common.machine()}; device {args.device}")
    print(f"model: Llama hidden {args.hidden}, {args.layers} layers, {args.heads}/{args.kv_heads} heads, intermediate "
          f"{args.intermediate}, vocab {args.vocab}, float32, sdpa; batch 1; "
          f"{args.threads_per_process} torch thread(s) per process; tiled loss tile {args.loss_tile_mib:g} MiB, "
          f"tile_mlps shards='auto'; budget {args.budget:g} GiB per rank")

    fixed: dict[tuple[str, int], dict] = {}
    for config in args.configs:
        for sp in args.sp:
            r = run_case(args, config, sp, [args.seq])[0]
            fixed[(config, sp)] = r
            log(f"  {config} sp {sp}: seq {args.seq} {r['peak'] / MIB:.0f} MiB ({r['time']:.0f} s)")
    base_key = ("plain", 1) if ("plain", 1) in fixed else next(iter(fixed))
    base = fixed[base_key]
    rows = [[config, sp, f"{r['peak'] / MIB:.0f}", f"{r['growth'] / MIB:.0f}", f"{r['peak'] / base['peak']:.2f}",
             f"{r['time']:.1f}"] for (config, sp), r in fixed.items()]
    print()
    print(f"Per-rank peak of one forward+backward at seq {args.seq} (max over ranks). peak = parameters "
          f"({base['params'] / MIB:.0f} MiB) + the step's growth (gradients, activations, temporaries); "
          f"ratio vs {base_key[0]} sp={base_key[1]} (= one rank of plain DDP, which does not split the sequence):")
    print()
    print(_common.table(["config", "sp", f"peak MiB @ {args.seq}", "step growth MiB", "peak ratio", "step s"], rows))

    found: dict[tuple[str, int], dict] = {}
    if args.search_configs:
        for config in args.search_configs:
            for sp in args.sp:
                g = args.granule * sp
                start = max(g, min(args.seq, args.max_local_seq * sp) // g * g)
                known = fixed.get((config, sp))
                debug = debug_search(args, config)
                start_peak = (known["peak"] if known and start == args.seq and not debug
                              else run_case(args, config, sp, [start], debug=debug)[0]["peak"])
                res = search(args, config, sp, start, start_peak, log)
                found[(config, sp)] = res
                log(f"  {config} sp {sp}: fits {res['lo']}, fails {res['hi']}, {res['probes']} probes")
        ref = found.get(("plain", 1), {}).get("lo")
        # the two longest lengths: short ones can sit on the flat floor of fixed-size tiles and buffers
        ests = {key: linear_estimate(sorted(res["points"])[-2:], budget) for key, res in found.items()}
        ref_est = ests.get(("plain", 1), (None, None, None))[2]
        rows = []
        for (config, sp), res in found.items():
            lo, hi = res["lo"], res["hi"]
            at_cap = lo is not None and hi is None
            shown = "none" if lo is None else (f">= {lo} (cap)" if at_cap else f"{lo}")
            bracket = "" if lo is None or hi is None else f"[{lo}, {hi})"
            ratio = "n/a" if not (lo and ref) else (f">= {lo / ref:.1f}" if at_cap else f"{lo / ref:.1f}")
            _, slope, est = ests[(config, sp)]
            slope_s = "n/a" if slope != slope else f"{slope / 1024:.0f}"
            est_s = "n/a" if est is None else f"{est:,.0f}"
            est_ratio = "n/a" if not (est and ref_est) else f"{est / ref_est:.1f}"
            rows.append([config + (" (debug attn)" if debug_search(args, config) else ""), sp, shown, bracket, ratio,
                         slope_s, est_s, est_ratio, res["probes"]])
        print()
        print(f"Longest sequence with per-rank peak <= {args.budget:g} GiB, measured: cap probed first, doubling, then "
              f"bisection to within {args.tolerance:.0%}; lengths are multiples of {args.granule}*sp, capped at "
              f"{args.max_local_seq} tokens per rank (CPU compute is slow: '>= cap' rows are lower bounds). "
              "KiB/token and 'linear est.' come from the line peak = a + b*seq through the two longest lengths "
              "measured for that row (memory is linear in seq here: the CPU sdpa kernel keeps no s^2 buffer and "
              "the tiles have a fixed size), extrapolated to the budget. '(debug attn)' rows were searched with "
              f"attention skipped in all but the last layer, capped at {args.debug_max_local_seq} tokens per rank. "
              "Ratios vs plain sp=1 (= one rank of plain DDP):")
        print()
        print(_common.table(["config", "sp", "max seq (measured)", "bracket [fits, fails)", "ratio vs plain DDP",
                             "KiB / token (fit)", "linear est. max seq", "est. ratio vs plain DDP", "probes"], rows))
    if args.plot_dir:
        import plots

        points = {key: [(args.seq, r["peak"])] for key, r in fixed.items()}
        for key, res in found.items():
            points.setdefault(key, []).extend(res["points"])
        path = plots.memory_limits(points, {key: res["lo"] for key, res in found.items()}, budget,
                                   Path(args.plot_dir) / "memory_limits.png",
                                   title=f"bench_memory: vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers; "
                                         f"{args.device}")
        print(f"plot: {path}")
    if args.device == "cpu":
        print()
        print("CPU: offload=True has nothing to offload to (host = device), so ckpt-offload rows show activation "
              "checkpointing alone; peaks are RSS-based (see the docstring).")
    print(f"total runtime {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()

"""Peak memory and time of sequence tiling vs untiled compute, measured in one run.

Cases (each forward + backward, on one process; no process group):

* ``lm-loss``: summed cross-entropy through an LM head on ``[batch, seq, hidden]`` hidden states, untiled
  (full ``[batch, seq, vocab]`` logits) vs :func:`lightning_ulysses.tiling.tiled_causal_lm_loss_sum`;
* ``mlp``: a HF ``LlamaMLP`` untiled vs :class:`lightning_ulysses.tiling.TiledMLP`.

Every case runs in a fresh subprocess so peaks do not leak between cases. Peak memory is the extra memory
above what the inputs and weights already use: on CPU the growth of ``ru_maxrss`` over its value right
after setup (with glibc's mmap threshold lowered so freed tensors leave the RSS), on CUDA
``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` after setup. On CPU the time comes
from a second subprocess with the default allocator (the lowered threshold adds page faults that
would count against the tiled cases). CPU times on a shared machine are noisy; use ``--repeats``.

    python benchmarks/bench_tiled.py                       # CPU defaults (seq 4096), ~3 min on 2 cores
    python benchmarks/bench_tiled.py --seq 16384 --hidden 512 --vocab 32000 128000 --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _worker(spec: dict) -> dict:
    """Run one case in this (fresh) process and return its peak extra memory and best time."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lightning_ulysses.losses.tiled_lm_loss import tiled_causal_lm_loss_sum
    from lightning_ulysses.tiling import TiledMLP, sequence_tiled_compute

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = spec["device"]
    dtype = getattr(torch, _DTYPES[spec["dtype"]])
    torch.manual_seed(0)
    batch, seq, shards = spec["batch"], spec["seq"], spec["shards"]

    if spec["kind"] == "lm-loss":
        hidden, vocab = spec["hidden"], spec["vocab"]
        module = nn.Linear(hidden, vocab, bias=False, device=device, dtype=dtype)
        x = torch.randn(batch, seq, hidden, device=device, dtype=dtype, requires_grad=True)
        labels = torch.randint(0, vocab, (batch, seq), device=device)

        def step(x: torch.Tensor, labels: torch.Tensor) -> None:
            if shards is None:
                logits = module(x).float()
                loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
            else:
                loss, _ = tiled_causal_lm_loss_sum(x, module, labels, shards)
            loss.backward()
    else:
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaMLP

        config = LlamaConfig(hidden_size=spec["hidden"], intermediate_size=spec["intermediate"])
        module = LlamaMLP(config).to(device=device, dtype=dtype)
        if shards is None:
            run = module
        elif spec.get("full_recompute"):
            # the generic path: every tile's MLP recomputed whole in backward (what TiledMLP did before
            # it learnt to skip down_proj for gated MLPs), for a before/after in the same run
            def run(x: torch.Tensor) -> torch.Tensor:
                return sequence_tiled_compute(module, x.shape[1], shards, {"x": x}, {}, "x", output_reduction=None)
        else:
            run = TiledMLP(module, shards)
        x = torch.randn(batch, seq, spec["hidden"], device=device, dtype=dtype, requires_grad=True)
        labels = None

        def step(x: torch.Tensor, labels: None) -> None:
            run(x).sum().backward()

    # A tiny warm-up loads kernels and lazy state without raising the memory peak of the real run.
    step(x[:, :2].detach().requires_grad_(), None if labels is None else labels[:, :2])
    x.grad = None
    module.zero_grad(set_to_none=True)
    _sync(device)

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    times = []
    for _ in range(max(1, spec["repeats"])):
        x.grad = None
        module.zero_grad(set_to_none=True)
        _sync(device)
        t0 = time.perf_counter()
        step(x, labels)
        _sync(device)
        times.append(time.perf_counter() - t0)

    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"peak_mib": peak / 2**20, "time_s": min(times)}


def _subprocess(spec: dict, env: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--_worker", json.dumps(spec)], capture_output=True,
                         text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"case {spec} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _run_case(spec: dict) -> dict:
    """Peak memory from one fresh subprocess, time from another (on CPU), so neither skews the other."""
    if spec["device"].startswith("cuda"):
        return _subprocess(spec, dict(os.environ))
    # glibc keeps freed blocks below its (adaptive, up to 32 MiB) mmap threshold in the heap, so RSS would
    # measure allocator fragmentation rather than live tensors; forcing mmap for every large block makes
    # ru_maxrss track the live bytes. That costs page faults on every allocation, more for the tiled cases
    # (more, smaller blocks), so the time comes from a second run with the default allocator.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    memory = _subprocess(spec, env)
    timed = _subprocess(spec, dict(os.environ))
    return {"peak_mib": memory["peak_mib"], "time_s": timed["time_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--dtype", default="fp32", choices=sorted(_DTYPES))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256, help="LM-head input size")
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000], help="e.g. 32000 128000")
    parser.add_argument("--shards", type=int, nargs="+", default=[4, 8, 16], help="tile counts for the LM loss")
    parser.add_argument("--mlp-hidden", type=int, default=256)
    parser.add_argument("--mlp-intermediate", type=int, default=1024)
    parser.add_argument("--mlp-shards", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--repeats", type=int, default=1, help="timed LM-loss runs per case (best is reported)")
    parser.add_argument("--mlp-repeats", type=int, default=5, help="timed MLP runs per case (best is reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--skip-mlp", action="store_true")
    parser.add_argument("--skip-loss", action="store_true")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._worker:
        print(json.dumps(_worker(json.loads(args._worker))))
        return

    common = {"device": args.device, "dtype": args.dtype, "batch": args.batch, "seq": args.seq,
              "repeats": args.repeats, "threads": args.threads}
    groups: list[tuple[str, dict, list[int]]] = []
    if not args.skip_loss:
        for vocab in args.vocab:
            groups.append((f"lm-loss b={args.batch} seq={args.seq} hidden={args.hidden} vocab={vocab}",
                           {**common, "kind": "lm-loss", "hidden": args.hidden, "vocab": vocab},
                           args.shards))
    if not args.skip_mlp:
        groups.append((f"mlp b={args.batch} seq={args.seq} hidden={args.mlp_hidden} inter={args.mlp_intermediate}",
                       {**common, "repeats": args.mlp_repeats, "kind": "mlp", "hidden": args.mlp_hidden,
                        "intermediate": args.mlp_intermediate},
                       args.mlp_shards))

    print(f"device={args.device} dtype={args.dtype} repeats={args.repeats} mlp_repeats={args.mlp_repeats}",
          file=sys.stderr)
    rows = ["| case | shards | peak MiB | ratio vs untiled | time s | time ratio |",
            "|---|---|---|---|---|---|"]
    for name, spec, shard_list in groups:
        base = _run_case({**spec, "shards": None})
        print(f"{name} untiled: {base}", file=sys.stderr)
        rows.append(f"| {name} | untiled | {base['peak_mib']:.0f} | 1.00 | {base['time_s']:.2f} | 1.00 |")
        variants = [("", {})] + ([(" (full recompute)", {"full_recompute": True})] if spec["kind"] == "mlp" else [])
        for shards in shard_list:
            for label, extra in variants:
                res = _run_case({**spec, **extra, "shards": shards})
                print(f"{name} shards={shards}{label}: {res}", file=sys.stderr)
                rows.append(f"| {name} | {shards}{label} | {res['peak_mib']:.0f} | "
                            f"{res['peak_mib'] / max(base['peak_mib'], 1e-9):.2f} | {res['time_s']:.2f} | "
                            f"{res['time_s'] / base['time_s']:.2f} |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()

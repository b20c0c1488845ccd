"""Training-step time (forward + backward) of a small GQA Llama: no SP vs Ulysses SP (vs DeepSpeed).

For every sequence length and every ``sp``:

* ``sp = 1``: the plain model on the full sequence in one process (no SP, no collectives);
* ``sp > 1``: ``sp`` gloo processes running ``apply_ulysses`` on the model, each fed its chunk by
  ``shard_batch``; ``out.loss`` is the exact whole-sequence loss;

Every process gets ``--threads-per-process`` torch threads (default 1): a process stands for one
device, as a rank does on GPUs, so ``sp = 2`` uses twice the hardware of ``sp = 1`` and the ideal
``step / no-SP step`` is about ``1/sp``. With more processes than cores (sp=4 on a 2-core VM) the
processes time-share the cores and that row measures oversubscription, not scaling.
* DeepSpeed (when importable): the same model, weights and chunks through DeepSpeed's Ulysses HF
  integration (``UlyssesSPAttentionHF.register_with_transformers``) with its documented loss recipe
  (``model.loss_function(logits, labels=None, shift_labels=...)`` per rank, then the differentiable
  token-weighted ``torch.distributed.nn.functional.all_gather`` aggregation). Our steps and
  DeepSpeed's alternate step by step (who goes first alternates too), so drifting machine load hits
  both alike.

A step's time is the slowest rank's ``forward + backward`` (gradients are set to ``None`` between
steps; no optimizer). After ``--warmup`` short steps (``--warmup-seq`` tokens: kernels, lazy state) the
median of ``--steps`` full-length steps is reported, with the spread (max - min) / median of those
steps. The DeepSpeed ratio is the median over adjacent (ours, DeepSpeed) step pairs of their ratio.
Timings are never asserted; CPU timings on a shared VM are noisy (see the spread column).

    python benchmarks/bench_step.py                      # seq 4096 8192, sp 1 2 4: ~5 min on 2 cores
    python benchmarks/bench_step.py --seq 16384 --sp 2 4 --steps 2
    python benchmarks/bench_step.py --steps 5            # steadier medians, ~2x longer
    python benchmarks/bench_step.py --no-deepspeed --sp 1 2
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
import warnings
from pathlib import Path

import _common
import torch
import torch.distributed as dist

from lightning_ulysses import apply_ulysses  # noqa: F401  (imported before forking)
from lightning_ulysses.lightning.data import shard_batch
from lightning_ulysses.parallel.mesh import build_mesh


def _plain_worker(rank: int, world: int, cfg: dict, seq: int, warmup: int, warmup_seq: int, steps: int) -> dict:
    model = _common.llama(**cfg)
    model.train()
    batches = [_common.full_batch(min(seq, warmup_seq), cfg["vocab"])] * warmup
    batches += [_common.full_batch(seq, cfg["vocab"])] * steps
    times = []
    for i, batch in enumerate(batches):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return {"ours": times, "loss": {"plain": float(loss.detach())}}


def _sp_worker(rank: int, world: int, cfg: dict, seqs: list[int], warmup: int, warmup_seq: int, steps: int,
               use_ds: bool, overlap_chunks: int) -> dict:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    dims = build_mesh("cpu", world)
    group = dims.sp_group
    ours = _common.llama(**cfg)
    ours.train()
    handles = [apply_ulysses(ours, group)]
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    variants = {"ours": ours}
    if overlap_chunks > 1:
        overlapped = _common.llama(**cfg)
        overlapped.train()
        handles.append(apply_ulysses(overlapped, group, overlap_chunks=overlap_chunks))
        variants["overlap"] = overlapped
    if use_ds:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import deepspeed
            from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

            deepspeed.init_distributed(dist_backend="gloo", verbose=False)
            ds_model = _common.llama(**cfg)
            ds_model.train()
            # Overrides ALL_ATTENTION_FUNCTIONS["sdpa"] globally ("Being John Malkovich"); our patched
            # model resolves "sdpa" through the same table, so the entry is swapped per variant below.
            mpu = UlyssesSPAttentionHF.register_with_transformers(
                ds_model, core_attn_implementation="sdpa", sequence_parallel_size=world, micro_batch_size=1,
                seq_length_is_variable=True)
        ds_sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
        ds_group = mpu.get_sequence_parallel_group()
        variants["deepspeed"] = ds_model

    def ds_step(model, batch):
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
        shift_labels = batch["shift_labels"]
        loss = model.loss_function(logits=out.logits, labels=None, shift_labels=shift_labels,
                                   vocab_size=model.config.vocab_size)
        # DeepSpeed's documented recipe: differentiable token-weighted aggregation over the SP group.
        losses = torch.distributed.nn.functional.all_gather(loss, group=ds_group)
        good = (shift_labels != -100).view(-1).sum()
        goods = torch.distributed.nn.functional.all_gather(good, group=ds_group)
        total = sum(losses[r] * goods[r] for r in range(world))
        return total / max(sum(goods), 1)

    results: dict[int, dict] = {}
    for seq in seqs:
        short = max(world, min(seq, warmup_seq) // world * world)
        batches = [shard_batch(_common.full_batch(short, cfg["vocab"]), dims.sp_rank, world)] * warmup
        batches += [shard_batch(_common.full_batch(seq, cfg["vocab"]), dims.sp_rank, world)] * steps
        times = {name: [] for name in variants}
        losses = {}
        for i, batch in enumerate(batches):
            # who goes first rotates, so no variant always inherits another's warm caches
            names = list(variants)
            order = [(n, variants[n]) for n in names[i % len(names):] + names[:i % len(names)]]
            for name, model in order:
                ALL_ATTENTION_FUNCTIONS["sdpa"] = ds_sdpa if name == "deepspeed" else sdpa
                model.zero_grad(set_to_none=True)
                dist.barrier()
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # torch.distributed.nn deprecation, once per step
                    loss = ds_step(model, batch) if name == "deepspeed" else model(**batch).loss
                    loss.backward()
                elapsed = time.perf_counter() - t0
                if i >= warmup:
                    times[name].append(elapsed)
                losses[name] = float(loss.detach())
        ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa
        results[seq] = {name: _common.max_over_ranks(t) for name, t in times.items()}
        results[seq]["loss"] = losses
    for handle in handles:
        handle.remove()
    return results


def _paired(a: list[float], b: list[float], b_name: str) -> str:
    # Steps interleave: the ratio within each round cancels slow load drift.
    ratios = [x / y for x, y in zip(a, b)]
    return f"{_common.median(ratios):.2f} ({b_name} {_common.median(b):.2f} s, pairs {min(ratios):.2f}-{max(ratios):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, nargs="+", default=[4096, 8192], help="e.g. 4096 8192 16384")
    parser.add_argument("--sp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones")
    parser.add_argument("--warmup-seq", type=int, default=2048,
                        help="sequence length of the warm-up steps (capped at --seq; kernels and lazy state only)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps (median reported)")
    _common.add_model_args(parser)
    parser.add_argument("--no-deepspeed", action="store_true", help="skip the DeepSpeed column")
    parser.add_argument("--overlap-chunks", type=int, default=1,
                        help="also time apply_ulysses(overlap_chunks=N) (head groups whose exchanges overlap "
                             "attention) in the same run; 1: skip")
    parser.add_argument("--plot-dir", default=None,
                        help="also write step_time.png here (step time vs sp; needs the plots extra)")
    args = parser.parse_args()

    cfg = _common.model_config(args)
    threads = args.threads_per_process
    cores = _common.cpu_count()
    ds_reason = "--no-deepspeed given" if args.no_deepspeed else _common.deepspeed_status()
    use_ds = ds_reason is None
    print(f"# bench_step: {_common.machine()}")
    print(f"model: Llama hidden {args.hidden}, {args.layers} layers, {args.heads} heads / {args.kv_heads} KV heads, "
          f"intermediate {args.intermediate}, vocab {args.vocab}, float32, sdpa; batch 1; "
          f"{threads} torch thread(s) per process, {cores} cores; warm-up {args.warmup}, median of {args.steps}")
    if not use_ds:
        if args.no_deepspeed:
            print("DeepSpeed column skipped (--no-deepspeed).")
        else:
            print("DeepSpeed not installed; column skipped. Install it without letting pip replace torch: "
                  f"pip install --no-build-isolation 'deepspeed>=0.17'. ({ds_reason})")
    else:
        import deepspeed

        print(f"DeepSpeed {deepspeed.__version__}: UlyssesSPAttentionHF.register_with_transformers, documented loss "
              "recipe (all_gather of per-rank mean losses weighted by token counts)")

    t_start = time.perf_counter()
    res: dict[tuple[int, int], dict] = {}
    for sp in args.sp:
        if sp == 1:
            for seq in args.seq:
                r = _common.launch(_plain_worker, 1, cfg, seq, args.warmup, args.warmup_seq, args.steps,
                                   threads=threads)[0]
                res[(seq, 1)] = r
                print(f"  seq {seq} sp 1: {r['ours']}", file=sys.stderr)
        else:
            out = _common.launch(_sp_worker, sp, cfg, args.seq, args.warmup, args.warmup_seq, args.steps, use_ds,
                                 args.overlap_chunks, threads=threads)[0]
            for seq, r in out.items():
                res[(seq, sp)] = r
                print(f"  seq {seq} sp {sp}: {r}", file=sys.stderr)

    with_overlap = args.overlap_chunks > 1 and any(sp > 1 for sp in args.sp)
    rows = []
    for seq in args.seq:
        base = res.get((seq, 1))
        base_t = _common.median(base["ours"]) if base else None
        for sp in args.sp:
            r = res[(seq, sp)]
            t = _common.median(r["ours"])
            ratio = f"{t / base_t:.2f}" if base_t else "n/a"
            if sp == 1:
                ds = "n/a (no SP)"
            elif "deepspeed" in r:
                ds = _paired(r["ours"], r["deepspeed"], "DS")
            else:
                ds = "skipped"
            row = [seq, sp, f"{t:.2f}", f"{_common.spread(r['ours']) * 100:.0f}%", ratio, f"{seq / t:,.0f}", ds]
            if with_overlap:
                if sp == 1:
                    row += ["n/a (no SP)", "n/a (no SP)"]
                else:
                    row.append(_paired(r["overlap"], r["ours"], "ours"))
                    row.append(_paired(r["overlap"], r["deepspeed"], "DS") if "deepspeed" in r else "skipped")
            rows.append(row)
    print()
    header = ["seq", "sp", "step s (median)", "spread", "step / no-SP step", "tokens/s", "ours / DeepSpeed step"]
    if with_overlap:
        header += [f"overlap_chunks={args.overlap_chunks} / ours", f"overlap_chunks={args.overlap_chunks} / DeepSpeed"]
    print(_common.table(header, rows))
    print()
    print("step = slowest rank's forward+backward; tokens/s = seq / step (one SP group, batch 1); "
          "ratios < 1 mean ours is faster. spread = (max-min)/median over the timed steps. a / b = "
          "median over the steps of a's time / b's time in the same step round (the variants' steps "
          "interleave); 'pairs' = its range.")
    over = [sp for sp in args.sp if sp * threads > cores]
    if over:
        print(f"note: sp {over} x {threads} thread(s) > {cores} cores: those processes time-share the cores, so "
              "their rows measure oversubscription, not SP scaling (the DeepSpeed ratio stays a fair comparison).")
    if args.plot_dir:
        import plots

        timed = [(seq, sp, _common.median(res[(seq, sp)]["ours"])) for seq in args.seq for sp in args.sp]
        path = plots.step_times(timed, Path(args.plot_dir) / "step_time.png",
                                title=f"bench_step: Llama hidden {args.hidden}, {args.layers} layers, "
                                      f"{args.heads}/{args.kv_heads} heads; {cores} cores")
        print(f"plot: {path}")
    print(f"total runtime {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()

"""Packed documents, padding and sliding windows: the segment path vs the dense-mask path, in one run.

Patterns (one row of ``--seq`` tokens each):

* ``packed/N``: ``N`` documents of uneven lengths (uniform in 0.5–1.5× ``seq/N``, seeded), positions
  restarting at every document, as a packing collate yields them;
* ``left-pad``: left padding over ``--pad`` of the row (an ``attention_mask``);
* ``window W``: one document, sliding window ``W`` (Mistral-style, every layer).

Part 1, attention per rank: one SP rank after the exchange (``--heads`` query / ``--kv-heads`` KV
heads of head dim ``--head-dim``, the local heads of a model at ``sp``), forward + backward of the
Ulysses attention body on the full sequence: the segment path (``segments.py``, the default), the
dense ``[1, 1, s, s]`` mask of before (``segments.dense_masks()``), and plain causal attention over the
whole row (``is_causal``, no mask) as the reference for memory. Each case runs in a fresh subprocess;
time from one with the default allocator, peak memory (growth of ``ru_maxrss`` over the inputs) from
another with glibc's mmap threshold lowered so that freed tensors leave the RSS (as in
``bench_tiled.py``).

Part 2, training step under ``UlyssesStrategy(sp=2)``: a Lightning ``Trainer`` on 2 gloo processes
fits a small Llama on the pattern's full-length sample; steps alternate between the segment path and
the dense path (a callback switches ``dense_masks()`` per step), so both see the same machine load; a
step is the slowest rank's ``on_train_batch_start`` → ``on_train_batch_end`` (forward, backward,
optimizer). The HF column is the plain model (no SP, one process) on the same batch with HF's own
masks. Every process has one torch thread.

    python benchmarks/bench_patterns.py                            # the README table (~25 min, 2 cores)
    python benchmarks/bench_patterns.py --seq 8192 --docs 16 --no-step   # attention only, quick
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


# -- patterns -----------------------------------------------------------------------------------


def doc_lengths(seq: int, n: int, seed: int = 0) -> list[int]:
    """``n`` uneven document lengths summing to ``seq``."""
    rng = random.Random(seed)
    raw = [rng.uniform(0.5, 1.5) for _ in range(n)]
    lens = [max(1, int(seq * r / sum(raw))) for r in raw]
    lens[-1] += seq - sum(lens)
    return lens


def pattern_batch(kind: str, seq: int, arg: float, vocab: int = 1024) -> dict:
    """The full-length sample of a pattern: ``input_ids``, ``labels`` and ``position_ids`` or
    ``attention_mask``; ``arg`` is the document count, the padded fraction or the window."""
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (1, seq), generator=g)
    batch = {"input_ids": ids, "labels": ids.clone()}
    if kind == "packed":
        pos = torch.tensor([[p for n in doc_lengths(seq, int(arg)) for p in range(n)]])
        batch["position_ids"] = pos
        batch["labels"] = ids.masked_fill(pos == 0, -100)
    elif kind == "left-pad":
        mask = torch.ones(1, seq, dtype=torch.long)
        mask[0, : int(seq * arg)] = 0
        batch["attention_mask"] = mask
        batch["labels"] = ids.masked_fill(mask == 0, -100)
    return batch


def pattern_name(kind: str, arg: float) -> str:
    return {"packed": f"packed, {int(arg)} docs", "left-pad": f"left padding {arg:.0%}",
            "window": f"window {int(arg)}"}[kind]


# -- part 1: attention on one rank ----------------------------------------------------------------


def _attention_worker(spec: dict) -> dict:
    import torch

    from lightning_ulysses.parallel.attention import _backend_call
    from lightning_ulysses.parallel.masks import SequenceMetadata
    from lightning_ulysses.parallel.segments import attention_paths, dense_masks, plan_segments

    torch.set_num_threads(1)
    seq, kind, arg, path = spec["seq"], spec["kind"], spec["arg"], spec["path"]
    batch = pattern_batch(kind, seq, arg)
    positions = batch.get("position_ids", torch.arange(seq)[None])
    valid = batch["attention_mask"].bool() if "attention_mask" in batch else None
    window = int(arg) if kind == "window" else None
    if path == "causal":  # the plain pattern at the same length: is_causal over the whole row
        positions, valid, window = torch.arange(seq)[None], None, None

    class Attn(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config, self.is_causal = type("C", (), {})(), True

    module, kwargs = Attn(), {"scaling": spec["head_dim"] ** -0.5, "dropout": 0.0, "sliding_window": window}

    def attend(q, k, v):
        meta = SequenceMetadata.from_gathered(positions, valid)
        plan = plan_segments(meta, spec["backend"], window, True) if path != "dense" else None
        if plan is not None:
            fn = plan.bind(lambda m, e: _backend_call(spec["backend"], module, m, {**kwargs, **e}), spec["backend"])
        else:
            if path == "dense":
                with dense_masks():
                    plan_segments(meta, spec["backend"], window, True)  # records the path
            mask, extra = meta.for_backend(spec["backend"], window, True, q.dtype)
            fn = _backend_call(spec["backend"], module, mask, {**kwargs, **extra})
        out = fn(q, k, v, spec["heads"] // spec["kv_heads"])
        out.sum().backward()
        return attention_paths(meta)[(spec["backend"], window, True)]

    torch.manual_seed(0)
    shape = (1, spec["heads"], seq, spec["head_dim"])
    q = torch.randn(*shape, requires_grad=True)
    k, v = (torch.randn(1, spec["kv_heads"], seq, spec["head_dim"], requires_grad=True) for _ in range(2))
    small = [x[:, :, :64].detach().requires_grad_() for x in (q, k, v)]
    old = positions, valid, window
    positions, valid, window = positions[:, :64], None if valid is None else valid[:, :64], window
    attend(*small)  # warm-up: kernels and lazy state, without raising the peak
    positions, valid, window = old
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(spec["repeats"]):
        for x in (q, k, v):
            x.grad = None
        t0 = time.perf_counter()
        taken = attend(q, k, v)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"time_s": min(times), "peak_mib": peak / 2**20, "path": taken}


def _subprocess(spec: dict, env: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--_worker", json.dumps(spec)], capture_output=True, text=True,
                         env=env)
    if out.returncode != 0:
        raise RuntimeError(f"case {spec} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def attention_case(spec: dict, memory: bool, in_process: bool = False) -> dict:
    if in_process:  # --in-process: quick checks and plots; no fresh process, so no peak memory
        return {**_attention_worker(spec), "peak_mib": float("nan")}
    timed = _subprocess(spec, dict(os.environ))
    if memory:
        timed["peak_mib"] = _subprocess(spec, {**os.environ, **MMAP_ENV})["peak_mib"]
    else:
        timed["peak_mib"] = float("nan")
    return timed


# -- part 2: the training step under UlyssesStrategy ---------------------------------------------


def _step_worker(rank: int, world: int, cfg: dict, batch: dict, window: int | None, steps: int) -> list[dict]:
    import contextlib

    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader

    import _common
    from lightning_ulysses import UlyssesStrategy
    from lightning_ulysses.parallel.segments import dense_masks

    class LM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = _model(cfg, window)

        def training_step(self, b, i):
            return self.model(**b).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    class Timer(pl.Callback):
        """Step ``i`` runs the dense path when ``i`` is odd; step 0 is a warm-up of the segment path."""

        def __init__(self) -> None:
            self.records: list[dict] = []
            self._stack = contextlib.ExitStack()

        def on_train_batch_start(self, trainer, lm, b, i):
            if i % 2:
                self._stack.enter_context(dense_masks())
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, lm, out, b, i):
            elapsed = time.perf_counter() - self._t0
            self._stack.close()
            self.records.append({"step": i, "path": "dense" if i % 2 else "segments", "s": elapsed,
                                 "loss": float(out["loss"])})

    samples = [{k: v[0] for k, v in batch.items()}] * (2 * steps + 2)
    timer = Timer()
    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy=UlyssesStrategy(sp=world), max_steps=2 * steps + 2,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, callbacks=[timer])
    trainer.fit(LM(), train_dataloaders=DataLoader(samples, batch_size=1))
    records = [r for r in timer.records if r["step"] >= 2]  # steps 0 and 1: warm-up of both paths
    times = _common.max_over_ranks([r["s"] for r in records])
    return [dict(r, s=t) for r, t in zip(records, times)]


def _model(cfg: dict, window: int | None):
    """The benchmarks' small Llama, or the same shapes as a Mistral with a sliding window."""
    import torch

    import _common

    if window is None:
        model = _common.llama(**cfg)
    else:
        from transformers import MistralConfig, MistralForCausalLM

        config = MistralConfig(vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
                               num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                               num_key_value_heads=cfg["kv_heads"], max_position_embeddings=1 << 20,
                               sliding_window=window, attn_implementation="sdpa", tie_word_embeddings=False)
        torch.manual_seed(0)
        model = MistralForCausalLM(config).float()
    model.train()
    return model


def hf_step(cfg: dict, batch: dict, window: int | None, steps: int) -> float:
    """Median fwd+bwd time of the plain HF model (no SP, this process, one thread) on ``batch``."""
    import torch

    torch.set_num_threads(1)
    model = _model(cfg, window)
    times = []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        model(**batch, use_cache=False).loss.backward()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, nargs="+", default=[16384, 32768])
    parser.add_argument("--docs", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--pad", type=float, default=0.25)
    parser.add_argument("--window", type=int, nargs="*", default=[4096],
                        help="windows, each at the longest --seq (none: no window row)")
    parser.add_argument("--heads", type=int, default=4, help="query heads on one rank after the exchange")
    parser.add_argument("--kv-heads", type=int, default=1)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--backend", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--dense-max-seq", type=int, default=16384,
                        help="skip the dense path above this length except for windows (its mask needs 5 s² bytes)")
    parser.add_argument("--step-seq", type=int, default=16384)
    parser.add_argument("--step-docs", type=int, default=16)
    parser.add_argument("--step-window", type=int, default=0, help="also a window pattern in the step (0: no)")
    parser.add_argument("--step-pad", action="store_true", help="also the left-padding pattern in the step")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per path (after one warm-up each)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--no-step", action="store_true")
    parser.add_argument("--no-attention", action="store_true")
    parser.add_argument("--in-process", action="store_true",
                        help="run the attention cases in this process (fast, for a quick look or the plot; no peak "
                             "memory: the table's memory columns read nan)")
    parser.add_argument("--plot-dir", default=None,
                        help="also write packed_vs_dense.png here (attention per pattern; needs the plots extra)")
    args = parser.parse_args()
    if args._worker:
        print(json.dumps(_attention_worker(json.loads(args._worker))))
        return

    import _common

    print(f"machine: {_common.machine()}")
    if not args.no_attention:
        patterns = [(s, "packed", n) for s in args.seq for n in args.docs]
        patterns += [(s, "left-pad", args.pad) for s in args.seq]
        patterns += [(max(args.seq), "window", w) for w in args.window]
        rows = []
        plotted = []
        causal_by_seq: dict[int, dict] = {}
        for seq, kind, arg in patterns:
            base = dict(seq=seq, kind=kind, arg=arg, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                        backend=args.backend, repeats=args.repeats)
            seg = attention_case(dict(base, path="segments"), memory=True, in_process=args.in_process)
            if seq not in causal_by_seq:  # the same for every pattern of this length
                causal_by_seq[seq] = attention_case(dict(base, path="causal"), memory=True, in_process=args.in_process)
            causal = causal_by_seq[seq]
            dense = None
            if seq <= args.dense_max_seq or kind == "window":
                try:
                    dense = attention_case(dict(base, path="dense"), memory=False, in_process=args.in_process)
                except RuntimeError as exc:  # e.g. killed for memory: report the rest of the table
                    print(f"dense path failed at seq {seq}: {str(exc)[-300:]}", flush=True)
            rows.append([seq, pattern_name(kind, arg), seg["path"], f"{seg['time_s']:.2f}",
                         f"{dense['time_s']:.2f}" if dense else "not run", f"{causal['time_s']:.2f}",
                         f"{seg['time_s'] / dense['time_s']:.2f}" if dense else "–",
                         f"{seg['peak_mib']:.0f}", f"{causal['peak_mib']:.0f}",
                         f"{seg['peak_mib'] / causal['peak_mib']:.2f}"])
            plotted.append((f"{seq}, {pattern_name(kind, arg)}", seg["time_s"], dense["time_s"] if dense else None,
                            causal["time_s"]))
            print(rows[-1], flush=True)
        if args.plot_dir:
            import plots

            path = plots.packed_vs_dense(plotted, Path(args.plot_dir) / "packed_vs_dense.png",
                                         title=f"bench_patterns: one rank after the exchange, {args.heads}/{args.kv_heads} "
                                               f"heads, head dim {args.head_dim}, {args.backend}")
            print(f"plot: {path}", flush=True)
        print(f"\nattention per rank ({args.backend}, {args.heads} query / {args.kv_heads} KV heads, head dim "
              f"{args.head_dim}, forward + backward, best of {args.repeats}):\n")
        print(_common.table(["seq", "pattern", "path", "segments s", "dense mask s", "plain causal s",
                             "segments / dense", "segments peak MiB", "causal peak MiB", "peak / causal"], rows))

    if not args.no_step:
        cfg = dict(hidden=256, layers=args.layers, heads=8, kv_heads=2, vocab=1024, intermediate=1024)
        seq = args.step_seq
        step_patterns = [("packed", args.step_docs)]
        if args.step_pad:
            step_patterns.append(("left-pad", args.pad))
        if args.step_window:
            step_patterns.append(("window", args.step_window))
        rows = []
        for kind, arg in step_patterns:
            batch = pattern_batch(kind, seq, arg, cfg["vocab"])
            window = int(arg) if kind == "window" else None
            records = _common.launch(_step_worker, 2, cfg, batch, window, args.steps, threads=1)[0]
            seg = _common.median([r["s"] for r in records if r["path"] == "segments"])
            dense = _common.median([r["s"] for r in records if r["path"] == "dense"])
            hf = hf_step(cfg, batch, window, args.steps)
            rows.append([seq, pattern_name(kind, arg), f"{seg:.2f}", f"{dense:.2f}", f"{seg / dense:.2f}",
                         f"{hf:.2f}", f"{seg / hf:.2f}"])
            print(rows[-1], flush=True)
        print(f"\ntraining step, UlyssesStrategy(sp=2), Llama hidden 256, {args.layers} layers, 8/2 heads, "
              f"median of {args.steps} steps per path, slowest rank:\n")
        print(_common.table(["seq", "pattern", "segments s", "dense mask s", "segments / dense",
                             "HF no SP (1 process) s", "segments / HF"], rows))


if __name__ == "__main__":
    main()

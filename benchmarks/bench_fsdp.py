"""Per-rank peak memory: UlyssesFSDPStrategy vs UlyssesStrategy at the same sequence length.

Runs a few Lightning training steps per configuration on 4 gloo processes (CPU) and measures the
second step of rank 0 with torch's ``MemTracker``: the peak of live tensor storage (parameters,
gradients, optimizer state, activations, temporaries), so the numbers do not include the interpreter
or the full model every rank builds before sharding.

Only the total is printed. MemTracker's per-category split is not reliable here: Lightning runs
forward and backward inside the closure it passes to ``optimizer.step``, so MemTracker files the
activations and gradients under its optimizer category.

    python benchmarks/bench_fsdp.py [--seq 4096] [--sp 2] [--world 4]     # ~10 min at seq 2048
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIGS = {
    "UlyssesStrategy (DDP)": ("ddp", {}, False),
    "UlyssesFSDPStrategy full": ("fsdp", {"sharding": "full"}, False),
    "UlyssesFSDPStrategy hybrid": ("fsdp", {"sharding": "hybrid"}, False),
    "FSDP + checkpointing": ("fsdp", {"activation_checkpointing": True}, False),
    "FSDP + checkpointing + offload": ("fsdp", {"activation_checkpointing": True, "offload_activations": True}, False),
}
# Tiled loss/MLP are measured by bench_tiled.py: MemTracker's module hooks cannot follow modules
# that a custom autograd Function calls in its forward.


def _worker(rank, world, port, args, name, queue):
    import lightning.pytorch as pl
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.utils.data import DataLoader
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_ulysses import TiledLossCallback, UlyssesFSDPStrategy, UlyssesStrategy

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    kind, kw, tiled = CONFIGS[name]

    class LM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                              num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=2,
                              max_position_embeddings=args.seq, attn_implementation="sdpa")
            self.model = LlamaForCausalLM(cfg)

        def training_step(self, batch, i):
            return self.model(**batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    class Measure(pl.Callback):
        def __init__(self):
            self.peak = None
            self.tracker = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 1:
                self.tracker = MemTracker()
                self.tracker.track_external(pl_module, *trainer.optimizers)
                self.tracker.__enter__()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 1:
                self.tracker.__exit__(None, None, None)
                self.peak = {str(k).split(".")[-1]: v for k, v in
                             self.tracker.get_tracker_snapshot("peak")[torch.device("cpu")].items()}

    ids = torch.randint(0, args.vocab, (world * 2, args.seq), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": x, "labels": x} for x in ids]
    strategy = (UlyssesStrategy(sp=args.sp, timeout=datetime.timedelta(seconds=600)) if kind == "ddp"
                else UlyssesFSDPStrategy(sp=args.sp, timeout=datetime.timedelta(seconds=600), **kw))
    measure = Measure()
    callbacks = [measure] + ([TiledLossCallback(shards=8, tile_mlp=True, mlp_shards=8)] if tiled else [])
    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_steps=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=callbacks)
    try:
        trainer.fit(LM(), DataLoader(data, batch_size=1))
    finally:  # a failed rank 0 must not leave the parent waiting on the queue
        if rank == 0:
            queue.put(measure.peak)


def run(name, args):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_worker, args=(r, args.world, port, args, name, queue)) for r in range(args.world)]
    for p in procs:
        p.start()
    try:
        peak = queue.get(timeout=1800)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    return peak


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--sp", type=int, default=2)
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--only", nargs="*", default=None, help="subset of configuration names")
    args = parser.parse_args()
    names = [n for n in CONFIGS if not args.only or any(o in n for o in args.only)]
    results = {n: run(n, args) for n in names}
    failed = [n for n, peak in results.items() if peak is None]
    if failed:
        raise SystemExit(f"worker failed for: {failed}")
    base = results[names[0]]["Total"]
    mib = 2**20
    print(f"\nper-rank peak of live tensor memory, rank 0 of {args.world} (sp={args.sp}, seq={args.seq}, "
          f"hidden={args.hidden}, layers={args.layers}, vocab={args.vocab}, AdamW, float32), MemTracker on CPU\n")
    print("| configuration | peak MiB | ratio to UlyssesStrategy (DDP) |")
    print("|---|---|---|")
    for n, peak in results.items():
        print(f"| {n} | {peak['Total'] / mib:.0f} | {peak['Total'] / base:.2f} |")
    print("\nCPU: offload moves the checkpointed layer inputs host -> host, so it cannot lower the peak here.")


if __name__ == "__main__":
    main()

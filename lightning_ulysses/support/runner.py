"""Run a function on N fork-started gloo processes (one machine, CPU) and collect each rank's result.

The support matrix and ``python -m lightning_ulysses.check --run`` compare a model under SP with the
untouched model on two such processes. Every process group gets a short collective timeout and every
wait for a result is bounded, so a deadlock ends in an error instead of a hang; every run gets its
own free port and a clean distributed environment (launcher variables of the parent are dropped in
the workers).
"""

from __future__ import annotations

import datetime
import io
import os
import socket
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK",
             "LOCAL_WORLD_SIZE", "GROUP_RANK", "PL_GLOBAL_SEED", "PL_TRAINER_GPUS")
PG_TIMEOUT = datetime.timedelta(seconds=90)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, queue, init_pg: bool, threads: int,
            pg_timeout: datetime.timedelta, backend: str) -> None:
    for key in _DIST_ENV:
        os.environ.pop(key, None)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(threads)
    try:
        if init_pg:
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=pg_timeout)
        result = fn(rank, world, *args)
        # Serialise here: tensors sent through the queue would be shared-memory handles that die
        # with this process before the parent reads them.
        buf = io.BytesIO()
        torch.save(result, buf)
        queue.put((rank, "ok", buf.getvalue()))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable, world: int, *args: Any, init_pg: bool = True, timeout: float = 240.0,
                    threads: int = 1, pg_timeout: datetime.timedelta = PG_TIMEOUT, backend: str = "gloo") -> list:
    """Run ``fn(rank, world, *args)`` on ``world`` fork-started processes; return results by rank.

    With ``init_pg=True`` a default group of ``backend`` (collective timeout ``pg_timeout``) is initialised
    before ``fn`` runs; otherwise only the environment (``MASTER_ADDR``/``MASTER_PORT``/``WORLD_SIZE``/
    ``RANK``/``LOCAL_RANK``) is set, as a launcher would, so that Lightning creates the group itself.
    Each process uses ``threads`` torch threads; ``timeout`` bounds the wait for each rank's result.
    """
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, queue, init_pg, threads,
                                                                 pg_timeout, backend)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world):
            rank, status, payload = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors.append(f"--- rank {rank} ---\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 30)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("distributed worker failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world)]


def preload() -> None:
    """Import transformers' lazily-loaded pieces in the parent before forking, so that fork-started
    workers inherit them instead of each re-importing model files (seconds each on a small machine)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM, masking_utils, modeling_utils  # noqa: F401
    from transformers.integrations import sdpa_attention  # noqa: F401

    # The first model construction builds the remaining lazy pieces.
    LlamaForCausalLM(LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2))
    del transformers

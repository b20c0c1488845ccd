"""Shared helpers of the benchmark scripts (not a benchmark itself).

* :func:`launch` runs ``fn(rank, world, *args)`` on ``world`` fork-started processes through the test
  suite's launcher (``tests/distributed.py``) with a per-process thread count and long timeouts;
* :func:`llama` builds the small float32 Llama the benchmarks share, identically in every process;
* :func:`full_batch` makes a full-length random batch (what a user's dataloader yields);
* :func:`machine`, :func:`table`: the machine line and markdown tables the scripts print.

Heavy imports (torch, transformers, the package) happen in the parent before forking, so the
workers do not pay them again (on the 2-core VM they take ~7 s per process).
"""

from __future__ import annotations

import datetime
import io
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from tests.distributed import run_distributed  # noqa: E402

PG_TIMEOUT = datetime.timedelta(seconds=900)


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def threads_per_process(world: int, total: int | None = None) -> int:
    """Split ``total`` (default: all usable cores) torch threads evenly over ``world`` processes."""
    return max(1, (total or cpu_count()) // world)


def launch(fn: Callable, world: int, *args: Any, threads: int | None = None, timeout: float = 1800.0,
           backend: str = "gloo") -> list:
    """Run ``fn(rank, world, *args)`` on ``world`` fork-started processes in one ``backend`` group; results by rank.

    The test suite's launcher (``tests/distributed.py``) with benchmark settings: each process gets
    ``threads`` torch threads (default: the cores split evenly, at least 1) and collectives may take
    minutes (long sequences on CPU). Raises with the first failing rank's traceback.
    """
    return run_distributed(fn, world, *args, timeout=timeout, threads=threads or threads_per_process(world),
                           pg_timeout=PG_TIMEOUT, backend=backend)


def llama(hidden: int = 256, layers: int = 4, heads: int = 8, kv_heads: int = 2, vocab: int = 1024,
          intermediate: int | None = None, head_dim: int | None = None, attn: str = "sdpa", seed: int = 0,
          max_positions: int = 1 << 20):
    """A float32 ``LlamaForCausalLM`` from a random config; the same ``seed`` gives the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=head_dim or hidden // heads, max_position_embeddings=max_positions,
                         attn_implementation=attn, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def add_model_args(parser) -> None:
    """The ``--hidden ... --threads-per-process`` options of the step benchmarks' small GQA Llama."""
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--threads-per-process", type=int, default=1,
                        help="torch threads of every process (each process stands for one device)")


def model_config(args) -> dict:
    """Keyword arguments of :func:`llama` from the options of :func:`add_model_args`."""
    return dict(hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads, vocab=args.vocab,
                intermediate=args.intermediate)


def full_batch(seq: int, vocab: int, batch: int = 1, seed: int = 1) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``labels`` (= input_ids) of random tokens, full sequence length."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def max_over_ranks(values: Sequence[float], group=None) -> list[float]:
    """Elementwise maximum of a list of floats over the ranks of ``group`` (a collective)."""
    t = torch.tensor(list(values), dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float]) -> float:
    """(max - min) / median of a sample, as a fraction."""
    return (max(values) - min(values)) / statistics.median(values) if values else float("nan")


def machine() -> str:
    """One line describing the machine and the versions."""
    import transformers

    mem = ""
    try:
        with open("/proc/meminfo") as f:
            total_kib = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
        mem = f", {total_kib / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):  # pragma: no cover
        pass
    return (f"{platform.machine()} {cpu_count()} cores{mem}; Python {platform.python_version()}, "
            f"torch {torch.__version__}, transformers {transformers.__version__}")


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def deepspeed_status() -> str | None:
    """``None`` when DeepSpeed's Ulysses HF integration imports, else the reason it does not."""
    try:
        import contextlib

        with contextlib.redirect_stdout(io.StringIO()):
            from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError or a broken install
        return f"{type(exc).__name__}: {exc}"
    return None

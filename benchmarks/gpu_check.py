"""The CUDA path, run for real on one GPU: SP parity, tiled compute, and the long-sequence memory headline.

One script, prepared on CPU, meant to run once on a single CUDA GPU in under 8 minutes and print
markdown tables:

1. **SP parity on CUDA.** Four ranks share the one GPU. NCCL refuses two ranks on one device
   ("Duplicate GPU detected"), so the ranks talk through **gloo with CUDA tensors**: gloo has CUDA
   variants of all-to-all, all-gather, all-reduce and broadcast that stage the data through host
   memory. That is slow but exact, and it is all a parity check needs: the attention kernels, the
   bf16 autocast path and flex_attention's compiled forward and backward run on the GPU as in
   training. Cases: sdpa in float32 and bf16 (autocast; the flash / memory-efficient kernels) and
   flex_attention training in bf16 and float32, each with a causal, packed-documents, padding and
   sliding-window batch, at sp = 2 and 4 (flex: sp = 2, its compiles are slow), against the
   same model without SP. Also
   ``UlyssesFSDPStrategy(offload_params=True)`` (FSDP2 CPU offload, the optimizer step on the host)
   against ``offload_params=False`` in a one-GPU Lightning ``Trainer``.
2. **Tiled loss and tiled MLP on CUDA**: peak memory (``torch.cuda.max_memory_allocated`` above the
   inputs and weights) and time against the untiled computation.
3. **Memory headline**, comparable with ALST's single-GPU record (Llama-8B, 500K tokens on one 80 GB
   H100): a Llama-3-8B-shaped model (hidden 4096, 32/8 heads, intermediate 14336, vocabulary 128256)
   with 1 and 2 decoder layers, bf16 compute, FSDP2 CPU offload of parameters, gradients and
   optimizer state, activation checkpointing with the layer inputs offloaded, and the tiled loss and
   MLP; peak GPU memory measured at two lengths for each layer count gives the fixed and per-token
   memory of the model without layers and of each layer, extrapolated to 32 layers and to the GPU's
   memory (the derivation is printed with the numbers).

Every case runs in fresh forked processes (the parent never touches CUDA, so forking stays legal);
a failure, hang or crash becomes a ``FAIL`` row with the error, never the end of the run; a global
time budget skips what no longer fits. ``--dry-run`` runs every section on CPU with tiny shapes
(gloo, CPU memory measures from the resident set) so the script is tested in CI.

    python benchmarks/gpu_check.py --dry-run                 # CPU, ~1 min
    timeout 570 python benchmarks/gpu_check.py --json $OUT/gpu_check.json   # one CUDA GPU, < 8 min
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import datetime
import gc
import importlib
import json
import os
import pickle
import platform
import queue as queue_mod
import signal
import socket
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# Workers are forked: the parent must not initialise CUDA. torch.cuda.is_available() (which libraries may
# call on import) does so unless it is told to ask NVML instead.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

import torch  # noqa: E402  (the one hard requirement; everything else is guarded)
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

GIB = 2**30
MIB = 2**20
MASKS = ("causal", "packed", "padding", "sliding_window")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# SP may be at most twice as far from the float32 reference as the same model without SP in the same
# backend and dtype, or FLOOR (fp32: the project's parity tolerance); the without-SP error counts up to
# CAP only, so a reference that is itself off (a backend ignoring a mask without SP) cannot loosen it.
FLOOR = {"fp32": 1e-5, "bf16": 1e-2}
CAP = {"fp32": 1e-5, "bf16": 3e-2}
CPU_FLEX_NA = "n/a on CPU: FlexAttention has no CPU backward in this torch"


# -- shapes -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Every size the script uses; :func:`shapes` gives the GPU and the dry-run presets."""

    # parity (section 1)
    seq: int
    batch: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    layers: int
    window: int
    # tiled (section 2)
    tile_seq: int
    tile_hidden: int
    tile_vocab: int
    tile_intermediate: int
    loss_shards: tuple[int | str, ...]
    mlp_shards: tuple[int | str, ...]
    tile_dtype: str
    repeats: int
    # headline (section 3)
    hl_hidden: int
    hl_heads: int
    hl_kv_heads: int
    hl_intermediate: int
    hl_vocab: int
    hl_seqs: tuple[int, int]
    hl_full_layers: int
    hl_dtype: str
    hl_loss_tile_bytes: int


def shapes(dry_run: bool) -> Shapes:
    if dry_run:
        return Shapes(seq=48, batch=2, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=96, vocab=97,
                      layers=2, window=8,
                      tile_seq=256, tile_hidden=32, tile_vocab=512, tile_intermediate=64, loss_shards=(4, "auto"),
                      mlp_shards=(4, "auto"), tile_dtype="fp32", repeats=1,
                      hl_hidden=64, hl_heads=4, hl_kv_heads=2, hl_intermediate=160, hl_vocab=256, hl_seqs=(256, 512),
                      hl_full_layers=4, hl_dtype="bf16", hl_loss_tile_bytes=64 * 1024)
    return Shapes(seq=4096, batch=2, hidden=1024, heads=16, kv_heads=4, head_dim=64, intermediate=2816, vocab=32000,
                  layers=2, window=512,
                  tile_seq=32768, tile_hidden=4096, tile_vocab=128256, tile_intermediate=14336,
                  loss_shards=(8, "auto"), mlp_shards=(8, "auto"), tile_dtype="bf16", repeats=3,
                  hl_hidden=4096, hl_heads=32, hl_kv_heads=8, hl_intermediate=14336, hl_vocab=128256,
                  hl_seqs=(65536, 131072), hl_full_layers=32, hl_dtype="bf16", hl_loss_tile_bytes=256 * MIB)


# -- guarded imports ----------------------------------------------------------------------------


def resolve(name: str, modules: tuple[str, ...] = ("lightning_ulysses",
                                                   "lightning_ulysses.lightning.activation_checkpointing",
                                                   "lightning_ulysses.checkpointing")) -> Any:
    """``name`` from the first of ``modules`` that has it: the package's public API first, then where
    older or newer layouts keep it, so the script survives the package being reorganised."""
    errors = []
    for mod in modules:
        try:
            return getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError) as exc:
            errors.append(f"{mod}: {type(exc).__name__}: {exc}")
    raise ImportError(f"{name} not found: " + "; ".join(errors))


def versions() -> dict[str, str]:
    """Versions of what the run depends on; a missing or broken package is reported, not raised."""
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("transformers", "lightning", "lightning_ulysses"):
        try:
            out[pkg] = getattr(importlib.import_module(pkg), "__version__", "?")
        except Exception as exc:  # noqa: BLE001 - any import failure is a finding of the run
            out[pkg] = f"IMPORT FAILED ({type(exc).__name__}: {exc})"
    return out


def preload() -> None:
    """Import everything the workers use, once, in the parent: forked workers inherit the modules
    instead of importing them again (seconds per process, times four ranks, for every case)."""
    for mod in ("transformers", "transformers.models.llama.modeling_llama",
                "transformers.models.mistral.modeling_mistral", "lightning.pytorch", "lightning_ulysses",
                "torch.distributed.fsdp", "torch.distributed._functional_collectives",
                "torch.distributed.checkpoint.state_dict", "torch.nn.attention.flex_attention"):
        with contextlib.suppress(Exception):  # a failure shows up in the versions line and the cases
            importlib.import_module(mod)


# -- processes ----------------------------------------------------------------------------------


class CaseError(RuntimeError):
    """A case failed, hung or crashed; the message is the shortest useful account of why."""


_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE",
             "GROUP_RANK", "PL_GLOBAL_SEED", "PL_TRAINER_GPUS")


def _free_port() -> int:
    """A free TCP port on localhost for the rendezvous of one case."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, out_q: Any, backend: str | None,
            pg_timeout: float, threads: int) -> None:
    for key in _DIST_ENV:
        os.environ.pop(key, None)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(threads)
    try:
        if backend is not None:
            dist.init_process_group(backend, rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=pg_timeout))
        out_q.put((rank, "ok", pickle.dumps(fn(rank, world, *args))))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent as text
        out_q.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def launch(fn: Callable, world: int, *args: Any, backend: str | None = "gloo", timeout: float = 300.0,
           threads: int = 1) -> list[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` fork-started processes; return the results by rank.

    ``backend=None`` leaves the process group to the function (Lightning creates its own). Unlike the
    test suite's launcher this one is built for an unattended run: a rank that dies without a result
    (segfault, OOM kill) fails the case at once, and at ``timeout`` every rank is killed, so one bad
    case costs at most its own timeout. Collectives time out a little earlier so a stuck rank's peers
    report where they waited. Raises :class:`CaseError`.
    """
    ctx = mp.get_context("fork")
    out_q = ctx.Queue()
    port = _free_port()
    pg_timeout = max(10.0, timeout - 15.0)
    # not daemonic: a daemon may not start processes, and compilers (inductor's worker pools in older torch)
    # do; the ``finally`` below kills the ranks instead, also when the parent is terminated (see main)
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, out_q, backend, pg_timeout, threads))
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    results: dict[int, Any] = {}
    try:
        while len(results) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CaseError(f"timed out after {timeout:.0f} s")
            try:
                rank, status, payload = out_q.get(timeout=min(left, 1.0))
            except queue_mod.Empty:
                dead = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead:
                    raise CaseError(f"rank {dead[0][0]} died with exit code {dead[0][1]} and no result") from None
                continue
            if status != "ok":
                raise CaseError(f"rank {rank}: {payload}")
            results[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            p.join(timeout=5 if len(results) == world else 0.5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return [results[r] for r in range(world)]


def short_error(text: str, limit: int = 220) -> str:
    """The last informative line of a traceback, made fit for a table cell."""
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    line = lines[-1] if lines else "unknown error"
    if len(lines) > 1 and line.startswith(("rank ", "During handling")):
        line = lines[-2]
    return line.replace("|", "/")[:limit]


# -- devices and memory -------------------------------------------------------------------------


def setup_device(device: str) -> torch.device:
    """This process's device. Every rank of a multi-rank case uses CUDA device 0 (the one GPU).

    TF32 is switched off so that float32 means float32 in the parity tables.
    """
    if device == "cuda":
        torch.cuda.set_device(0)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        return torch.device("cuda", 0)
    return torch.device("cpu")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class Meter:
    """Peak memory of a region above its start: CUDA allocator statistics, or on CPU the resident set.

    On CPU the peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) is used with glibc
    told to return every block of 128 KiB or more to the system on free (``mallopt``), so that freed
    tensors leave the resident set; the figure is indicative (interpreter and allocator noise), which is
    why CPU peaks are flagged in the tables. ``None`` where neither is available.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = 0
        self.cpu_ok = False
        if device.type == "cpu":
            try:
                libc = ctypes.CDLL("libc.so.6")
                libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD, fixed (no dynamic raise)
                libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
                _status_kib("VmHWM")
                self.cpu_ok = True
            except (OSError, RuntimeError, AttributeError):
                self.cpu_ok = False

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset(self) -> None:
        gc.collect()
        self.sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        elif self.cpu_ok:
            with contextlib.suppress(OSError):
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # VmHWM := VmRSS
                self.base = _status_kib("VmRSS") * 1024
            except OSError:
                self.cpu_ok = False

    def peak(self) -> int | None:
        """Peak bytes above the start of the region."""
        self.sync()
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.base
        if self.cpu_ok:
            return _status_kib("VmHWM") * 1024 - self.base
        return None

    def peak_total(self) -> int | None:
        """Peak bytes including what was allocated before the region (CUDA only)."""
        self.sync()
        return torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None


def host_peak_bytes() -> int | None:
    """This process's peak resident set since start (or the last reset), for the host side of offload."""
    try:
        return _status_kib("VmHWM") * 1024
    except (OSError, RuntimeError):
        return None


# -- section 0: environment ---------------------------------------------------------------------


def _env_worker(rank: int, world: int, spec: dict) -> dict:
    """Device facts, and whether flex_attention can train here (an uncompiled call, fwd + bwd)."""
    info: dict[str, Any] = {}
    dev = setup_device(spec["device"])
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        free, total = torch.cuda.mem_get_info(dev)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}", total=total, free=free,
                    cuda=torch.version.cuda)
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        q, k, v = (torch.randn(1, 2, 128, 16, device=dev, requires_grad=True) for _ in range(3))
        mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, 128, 128, device=dev.type)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "flex_attention called without torch.compile"
            flex_attention(q, k, v, block_mask=mask).sum().backward()
        info["flex_train"] = None
    except Exception as exc:  # noqa: BLE001
        info["flex_train"] = f"{type(exc).__name__}: {exc}"
    return info


def _collectives_worker(rank: int, world: int, spec: dict) -> dict:
    """The collectives SP uses, on this device's tensors through the default (gloo) group."""
    import torch.distributed._functional_collectives as funcol

    dev = setup_device(spec["device"])
    x = torch.arange(8.0, device=dev) + 8 * rank
    out: dict[str, bool] = {}
    y = funcol.wait_tensor(funcol.all_to_all_single_autograd(x, None, None, dist.group.WORLD))
    expect = torch.cat([torch.arange(8.0)[4 * rank:4 * rank + 4] + 8 * r for r in range(world)])
    out["all_to_all_single (functional)"] = bool(torch.equal(y.cpu(), expect))
    s = x.clone()
    dist.all_reduce(s)
    out["all_reduce"] = bool(torch.equal(s.cpu(), sum(torch.arange(8.0) + 8 * r for r in range(world))))
    chunks = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(chunks, x)
    out["all_gather"] = all(torch.equal(c.cpu(), torch.arange(8.0) + 8 * r) for r, c in enumerate(chunks))
    out["device"] = str(y.device)
    return out


# -- section 1: SP parity -----------------------------------------------------------------------


def _parity_batch(mask: str, s: Shapes) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A full-length batch of the given mask type and the ``[b, seq]`` real-token mask."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, s.vocab, (s.batch, s.seq), generator=g)
    labels = ids.clone()
    real = torch.ones(s.batch, s.seq, dtype=torch.bool)
    batch: dict[str, torch.Tensor] = {"input_ids": ids}
    if mask == "packed":
        rows = []
        for _ in range(s.batch):
            pos: list[int] = []
            while len(pos) < s.seq:  # documents of 1/16 to 1/3 of the row, so they straddle SP chunks
                n = int(torch.randint(max(1, s.seq // 16), max(2, s.seq // 3), (1,), generator=g))
                pos += list(range(n))
            rows.append(pos[:s.seq])
        position_ids = torch.tensor(rows)
        labels = labels.masked_fill(position_ids == 0, -100)  # no target across a document boundary
        batch["position_ids"] = position_ids
    elif mask == "padding":
        # row 0 right-padded over 3/8 of the sequence (at sp = 4 one rank holds only padding), row 1 full
        real[0, s.seq - 3 * s.seq // 8:] = False
        labels = labels.masked_fill(~real, -100)
        batch["attention_mask"] = real.long()
    batch["labels"] = labels
    return batch, real


def _model(s: Shapes, attn: str, window: int | None) -> torch.nn.Module:
    """The parity model on CPU, float32, identical in every process: Llama, or Mistral for a window."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    kw = dict(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
              num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
              head_dim=s.head_dim, max_position_embeddings=max(4096, 2 * s.seq), attn_implementation=attn,
              tie_word_embeddings=False)
    torch.manual_seed(0)
    if window:
        return MistralForCausalLM(MistralConfig(sliding_window=window, **kw)).float()
    return LlamaForCausalLM(LlamaConfig(**kw)).float()


def _rel(a: torch.Tensor, e: torch.Tensor) -> float:
    a, e = a.detach().double(), e.detach().double()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


def _ratio(a: torch.Tensor, e: torch.Tensor) -> float:
    a, e = a.detach().double().flatten(), e.detach().double().flatten()
    return (a @ e / (e @ e).clamp_min(1e-300)).item()


def _parity_worker(rank: int, world: int, spec: dict) -> dict:
    """One (backend, dtype, mask) case on ``world`` ranks: the non-SP model in the same backend and dtype,
    then SP at each of ``spec["sps"]``, all measured against the non-SP float32 sdpa reference."""
    from lightning_ulysses import apply_ulysses, shard_batch

    s: Shapes = spec["shapes"]
    dev = setup_device(spec["device"])
    mask, attn, dtype = spec["mask"], spec["attn"], DTYPES[spec["dtype"]]
    window = s.window if mask == "sliding_window" else None
    batch, real = _parity_batch(mask, s)
    real_d = real.to(dev)

    def autocast() -> Any:
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(dev.type, dtype=dtype)

    def to_dev(b: dict) -> dict:
        return {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in b.items()}

    # groups for every sp: contiguous ranks, created by all ranks in the same order
    groups: dict[int, tuple[Any, int]] = {}
    for sp in spec["sps"]:
        for start in range(0, world, sp):
            g = dist.new_group(list(range(start, start + sp))) if sp < world else dist.group.WORLD
            if start <= rank < start + sp:
                groups[sp] = (g, rank - start)

    ref = _model(s, "sdpa", window).to(dev)
    out = ref(**to_dev(batch), use_cache=False)
    out.loss.backward()
    ref_logits, ref_loss = out.logits.detach().float(), out.loss.detach().float()
    ref_grads = {n: p.grad.detach().float().clone() for n, p in ref.named_parameters()}
    del ref, out

    def compare(logits: torch.Tensor, loss: torch.Tensor, grads: dict[str, torch.Tensor], lo: int, hi: int) -> dict:
        r = real_d[:, lo:hi]
        g_err = {n: _rel(grads[n], ref_grads[n]) for n in ref_grads}
        ratios = [_ratio(grads[n], ref_grads[n]) for n in ref_grads]
        worst = max(g_err, key=g_err.get)
        return {"loss": _rel(loss.float(), ref_loss), "logits": _rel(logits.float()[r], ref_logits[:, lo:hi][r]),
                "grad": g_err[worst], "grad_name": worst, "ratio_lo": min(ratios), "ratio_hi": max(ratios),
                "loss_value": float(loss)}

    base = _model(s, attn, window).to(dev)
    with autocast():
        out = base(**to_dev(batch), use_cache=False)
    out.loss.backward()
    result: dict[str, Any] = {"nonsp": compare(out.logits.detach(), out.loss.detach(),
                                                {n: p.grad for n, p in base.named_parameters()}, 0, s.seq)}
    del base, out

    for sp in spec["sps"]:
        group, sp_rank = groups[sp]
        model = _model(s, attn, window).to(dev)
        handle = apply_ulysses(model, group)
        shard = to_dev(shard_batch(batch, sp_rank, sp))
        with autocast():
            out = model(**shard)
        out.loss.backward()
        grads = {}
        for n, p in model.named_parameters():
            g = p.grad.detach().float().clone()
            dist.all_reduce(g, group=group)  # what DDP's average over the SP ranks sees, times sp
            grads[n] = g / sp
        chunk = s.seq // sp
        result[f"sp{sp}"] = compare(out.logits.detach(), out.loss.detach(), grads, sp_rank * chunk,
                                    (sp_rank + 1) * chunk)
        handle.remove()
        del model, out
    if dev.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated(dev) / GIB
    return result


def judge(sp_m: dict, nonsp_m: dict, dtype: str, same_loss: bool) -> str:
    """PASS, or FAIL naming the first metric out of bounds (see ``FLOOR``)."""
    if not same_loss:
        return "FAIL: SP ranks disagree on the loss"
    for key in ("loss", "logits", "grad"):
        bound = max(FLOOR[dtype], 2 * min(nonsp_m[key], CAP[dtype]))
        if not sp_m[key] <= bound:
            return f"FAIL: {key} error {sp_m[key]:.2e} > {bound:.1e}"
    ratio_err = max(abs(sp_m["ratio_lo"] - 1), abs(sp_m["ratio_hi"] - 1))
    nonsp_ratio = max(abs(nonsp_m["ratio_lo"] - 1), abs(nonsp_m["ratio_hi"] - 1))
    bound = max(FLOOR[dtype], 2 * min(nonsp_ratio, CAP[dtype]))
    if not ratio_err <= bound:
        return f"FAIL: gradient ratio off by {ratio_err:.2e} > {bound:.1e}"
    return "PASS"


# -- section 1b: FSDP2 CPU offload in the strategy ----------------------------------------------


def _offload_worker(rank: int, world: int, spec: dict) -> dict:
    """Three Lightning steps of UlyssesFSDPStrategy on one device, with or without ``offload_params``."""
    import lightning.pytorch as pl
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.utils.data import DataLoader

    from lightning_ulysses import UlyssesFSDPStrategy

    s: Shapes = spec["shapes"]
    setup_device(spec["device"])

    class LM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = _model(s, "sdpa", None)
            self.losses: list[float] = []
            self.devices: dict[str, str] = {}

        def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
            out = self.model(**batch)
            self.losses.append(out.loss.item())
            return out.loss

        def on_before_optimizer_step(self, optimizer: Any) -> None:
            p = next(self.model.parameters())
            self.devices = {"param": str(p.device), "grad": str(p.grad.device)}

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    samples = [{k: v[0] for k, v in _parity_batch("causal", s)[0].items()} for _ in range(3)]
    lm = LM()
    trainer = pl.Trainer(accelerator=spec["device"], devices=1, max_steps=3, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         gradient_clip_val=spec.get("clip"),
                         strategy=UlyssesFSDPStrategy(sp=1, offload_params=spec["offload"]))
    t0 = time.perf_counter()
    trainer.fit(lm, train_dataloaders=DataLoader(samples, batch_size=1))
    elapsed = time.perf_counter() - t0
    state = get_model_state_dict(lm.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    opt_state = trainer.optimizers[0].state
    opt_dev = {str(t.device) for st in opt_state.values() for t in st.values() if isinstance(t, torch.Tensor)}
    return {"losses": lm.losses, "state": {k: v.float() for k, v in state.items()}, "devices": lm.devices,
            "opt_devices": sorted(opt_dev), "time": elapsed}


# -- section 2: tiled loss and MLP --------------------------------------------------------------


def _tiled_worker(rank: int, world: int, spec: dict) -> dict:
    """Peak memory above inputs and weights, and the best time, of one forward + backward."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaMLP

    from lightning_ulysses import TiledMLP, apply_tiled_loss

    s: Shapes = spec["shapes"]
    dev = setup_device(spec["device"])
    meter = Meter(dev)
    dtype = DTYPES[s.tile_dtype]
    shards = spec["shards"]
    torch.manual_seed(0)
    if spec["kind"] == "lm-loss":
        # no decoder layer: embedding, final norm, LM head and loss; exactly what the tiled loss replaces
        config = LlamaConfig(vocab_size=s.tile_vocab, hidden_size=s.tile_hidden, intermediate_size=s.tile_hidden,
                             num_hidden_layers=0, num_attention_heads=1, num_key_value_heads=1,
                             tie_word_embeddings=False)
        module = LlamaForCausalLM(config).to(dev, dtype)
        if shards is not None:
            apply_tiled_loss(module, shards=shards)
        ids = torch.randint(0, s.tile_vocab, (1, s.tile_seq), device=dev)

        def step(n: int) -> None:
            module(input_ids=ids[:, :n], labels=ids[:, :n], use_cache=False).loss.backward()
    else:
        config = LlamaConfig(hidden_size=s.tile_hidden, intermediate_size=s.tile_intermediate)
        mlp = LlamaMLP(config).to(dev, dtype)
        module = mlp
        run = mlp if shards is None else TiledMLP(mlp, shards)
        x = torch.randn(1, s.tile_seq, s.tile_hidden, device=dev, dtype=dtype, requires_grad=True)

        def step(n: int) -> None:
            x.grad = None
            run(x[:, :n]).sum().backward()

    step(max(2, s.tile_seq // 64))  # warm-up: kernels and lazy state, below the real peak
    module.zero_grad(set_to_none=True)
    times, peaks = [], []
    for _ in range(s.repeats):
        module.zero_grad(set_to_none=True)
        meter.reset()
        t0 = time.perf_counter()
        step(s.tile_seq)
        meter.sync()
        times.append(time.perf_counter() - t0)
        peaks.append(meter.peak())
    return {"time": min(times), "peak": None if peaks[0] is None else max(peaks)}


# -- section 3: the memory headline -------------------------------------------------------------


def _headline_worker(rank: int, world: int, spec: dict) -> dict:
    """Peak device memory of training steps of the ALST recipe at each length (ascending), ``layers`` layers.

    The recipe: FSDP2 on this one rank with ``CPUOffloadPolicy`` (parameters, gradients and optimizer
    state on the host; bf16 compute, float32 gradient reduction), every decoder layer checkpointed with
    its input offloaded to the host, the tiled loss and tiled MLPs. The same calls as
    ``UlyssesFSDPStrategy(offload_params=True, activation_checkpointing=True, offload_activations=True,
    param_dtype="bfloat16", reduce_dtype="float32")`` with ``TiledLossCallback(tile_mlp=True)``.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_ulysses import apply_tiled_loss, tile_mlps

    checkpoint_decoder_layers = resolve("checkpoint_decoder_layers")
    decoder_layers = resolve("decoder_layers")
    s: Shapes = spec["shapes"]
    dev = setup_device(spec["device"])
    meter = Meter(dev)
    config = LlamaConfig(vocab_size=s.hl_vocab, hidden_size=s.hl_hidden, intermediate_size=s.hl_intermediate,
                         num_hidden_layers=spec["layers"], num_attention_heads=s.hl_heads,
                         num_key_value_heads=s.hl_kv_heads, max_position_embeddings=2 * max(s.hl_seqs),
                         rope_theta=500000.0, attn_implementation="sdpa", tie_word_embeddings=False)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = LlamaForCausalLM(config)  # float32 master weights on the host
    init_s = time.perf_counter() - t0
    model.train()
    checkpoint_decoder_layers(model, offload=True)
    tile_mlps(model)
    apply_tiled_loss(model, tile_bytes=s.hl_loss_tile_bytes)
    mesh = init_device_mesh(dev.type, (1,))
    policy = dict(mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=DTYPES[s.hl_dtype],
                                                            reduce_dtype=torch.float32),
                  offload_policy=CPUOffloadPolicy(pin_memory=dev.type == "cuda"))
    for layer in decoder_layers(model):
        fully_shard(layer, **policy)
    fully_shard(model, **policy)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(1)
    out = []

    def step(n: int) -> float:
        ids = torch.randint(0, s.hl_vocab, (1, n), generator=g).to(dev)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        return loss.item()

    step(256)  # warm-up: kernels, FSDP lazy init, pinned buffers
    model.zero_grad(set_to_none=True)
    for n in sorted(s.hl_seqs):
        model.zero_grad(set_to_none=True)
        meter.reset()
        t0 = time.perf_counter()
        loss = step(n)
        meter.sync()
        out.append({"seq": n, "peak": meter.peak_total() if dev.type == "cuda" else meter.peak(),
                    "reserved": torch.cuda.max_memory_reserved(dev) if dev.type == "cuda" else None,
                    "time": time.perf_counter() - t0, "loss": loss})
    t0 = time.perf_counter()
    opt.step()  # on the host: the parameters and gradients live there
    opt_s = time.perf_counter() - t0
    param_dev = {str(p.device) for p in model.parameters()}
    grad_dev = {str(p.grad.device) for p in model.parameters() if p.grad is not None}
    info = {"points": out, "init_s": init_s, "opt_s": opt_s, "param_devices": sorted(param_dev),
            "grad_devices": sorted(grad_dev), "host_peak": host_peak_bytes(),
            "params": sum(p.numel() for p in model.parameters())}
    if dev.type == "cuda":
        free, total = torch.cuda.mem_get_info(dev)
        info.update(total=total, free=free, reserved_now=torch.cuda.memory_reserved(dev))
    return info


def line(points: list[tuple[int, float]]) -> tuple[float, float]:
    """``(a, b)`` of ``peak = a + b * seq`` through two points."""
    (s1, p1), (s2, p2) = sorted(points)[:2]
    b = (p2 - p1) / (s2 - s1)
    return p1 - b * s1, b


def headline_estimate(fits: dict[int, tuple[float, float]], full_layers: int, capacity: float) -> dict:
    """Whole-model fixed and per-token memory from the 1- and 2-layer lines, and the longest sequence.

    ``peak(L, s) = a_L + b_L s``; one more layer adds ``da = a_2 - a_1`` and ``db = b_2 - b_1``, so the
    ``full_layers`` model has ``a = a_2 + (full_layers - 2) da`` and ``b = b_2 + (full_layers - 2) db``,
    and the longest sequence is ``(capacity - a) / b``.
    """
    (a1, b1), (a2, b2) = fits[1], fits[2]
    da, db = a2 - a1, b2 - b1
    a = a2 + (full_layers - 2) * max(da, 0.0)
    b = b2 + (full_layers - 2) * max(db, 0.0)
    return {"a1": a1, "b1": b1, "a2": a2, "b2": b2, "da": da, "db": db, "a": a, "b": b,
            "max_seq": (capacity - a) / b if b > 0 else float("inf")}


# -- the run ------------------------------------------------------------------------------------


class Run:
    """The cases of one invocation: a global deadline, and every row recorded whatever happens."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = "cpu" if args.dry_run else "cuda"
        self.s = shapes(args.dry_run)
        self.deadline = time.monotonic() + args.budget
        self.started = time.monotonic()
        self.results: dict[str, Any] = {"device": self.device, "dry_run": args.dry_run}

    def left(self) -> float:
        """Seconds left of the budget."""
        return self.deadline - time.monotonic()

    def log(self, msg: str) -> None:
        """A progress line on stderr (the tables go to stdout at the end)."""
        print(f"[{time.monotonic() - self.started:6.1f} s] {msg}", file=sys.stderr, flush=True)

    def case(self, name: str, fn: Callable, world: int, spec: dict, timeout: float,
             backend: str | None = "gloo") -> tuple[list[Any] | None, str | None]:
        """``(results by rank, None)`` or ``(None, why not)``; never raises."""
        left = self.left()
        if left < 10:
            self.log(f"{name}: skipped (time budget)")
            return None, "SKIPPED: time budget spent"
        if self.args.dry_run:
            timeout *= 3  # a loaded CI machine: the dry run is about logic, its per-case limits only catch hangs
        t0 = time.monotonic()
        try:
            # a one-process case has the machine's cores to itself (host-side init and optimizer steps)
            # The dry run runs inside a test process that has already used OpenMP: a forked child that
            # starts a multi-threaded OpenMP region can hang, so it stays on one thread there.
            threads = self.args.threads if world > 1 or self.args.dry_run else max(self.args.threads,
                                                                                    os.cpu_count() or 1)
            res = launch(fn, world, {**spec, "shapes": self.s, "device": self.device}, backend=backend,
                         timeout=min(timeout, left - 5), threads=threads)
        except Exception as exc:  # noqa: BLE001 - CaseError, or a launcher failure: both are a row
            self.log(f"{name}: FAILED after {time.monotonic() - t0:.0f} s: {short_error(str(exc))}")
            return None, f"FAIL: {short_error(str(exc))}"
        self.log(f"{name}: done in {time.monotonic() - t0:.0f} s")
        return res, None


def section_env(run: Run) -> list[str]:
    """The versions and device lines, the flex_attention probe, and the collectives table."""
    out = []
    res, err = run.case("environment", _env_worker, 1, {}, timeout=120, backend=None)
    info = res[0] if res else {}
    info["versions"] = versions()
    run.results["env"] = info
    vers = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    out.append(f"# gpu_check ({'dry run, CPU' if run.args.dry_run else 'CUDA'}): {platform.machine()}, "
               f"{os.cpu_count()} CPUs; {vers}")
    if "gpu" in info:
        out.append(f"GPU: {info['gpu']} (compute capability {info['capability']}, CUDA {info['cuda']}), "
                   f"{info['total'] / GIB:.1f} GiB total, {info['free'] / GIB:.1f} GiB free at start")
    if err:
        out.append(f"environment probe: {err}")
    flex = info.get("flex_train")
    run.results["flex_train"] = flex
    out.append("flex_attention training (uncompiled probe, fwd + bwd): " + ("works" if flex is None else flex))
    res, err = run.case("collectives", _collectives_worker, 2, {}, timeout=60)
    rows = [[k, "yes" if v else "WRONG RESULT"] for k, v in (res[0].items() if res else []) if k != "device"]
    run.results["collectives"] = res[0] if res else err
    out.append("")
    out.append(f"Collectives through one gloo group on {run.device} tensors (2 ranks, one device)"
               + (f": {err}" if err else ":"))
    if rows:
        out.append("")
        out.append(table(["collective", "correct"], rows))
    return out


def section_parity(run: Run, attns: tuple[str, ...], rows: list[list[Any]]) -> None:
    """Append to ``rows`` (as they finish, for a run cut short) the parity rows of the given attention
    backends: one 4-rank case per dtype and mask."""
    flex_na = run.results.get("flex_train")
    for attn in attns:
        # flex compiles its kernels for every model and mask, which takes most of its time: sp 2 only
        # (two SP groups in the world of four), bf16 (what users train in) first
        sps = (2,) if attn == "flex_attention" else (2, 4)
        for dtype in (("bf16", "fp32") if attn == "flex_attention" else ("fp32", "bf16")):
            for mask in MASKS:
                name = f"parity {attn} {dtype} {mask}"
                if attn == "flex_attention" and flex_na is not None:
                    why = CPU_FLEX_NA if run.device == "cpu" else f"n/a: flex_attention cannot train here ({flex_na})"
                    rows += [[attn, dtype, mask, sp, "", "", "", "", "", why] for sp in sps]
                    run.results.setdefault("parity", []).append({"case": name, "status": why})
                    continue
                timeout = 240 if attn == "flex_attention" else 120
                res, err = run.case(name, _parity_worker, 4, {"attn": attn, "dtype": dtype, "mask": mask,
                                                              "sps": sps}, timeout=timeout)
                for sp in sps:
                    if res is None:
                        rows.append([attn, dtype, mask, sp, "", "", "", "", "", err])
                        continue
                    key = f"sp{sp}"
                    worst = {m: max(r[key][m] for r in res) for m in ("loss", "logits", "grad")}
                    ratio_lo, ratio_hi = min(r[key]["ratio_lo"] for r in res), max(r[key]["ratio_hi"] for r in res)
                    nonsp = {m: max(r["nonsp"][m] for r in res) for m in ("loss", "logits", "grad")}
                    nonsp.update(ratio_lo=min(r["nonsp"]["ratio_lo"] for r in res),
                                 ratio_hi=max(r["nonsp"]["ratio_hi"] for r in res))
                    same_loss = True
                    for start in range(0, 4, sp):
                        vals = [res[r][key]["loss_value"] for r in range(start, start + sp)]
                        same_loss &= max(vals) - min(vals) <= 1e-6 * abs(vals[0])
                    status = judge({**worst, "ratio_lo": ratio_lo, "ratio_hi": ratio_hi}, nonsp, dtype, same_loss)
                    rows.append([attn, dtype, mask, sp, f"{worst['loss']:.1e}", f"{worst['logits']:.1e}",
                                 f"{worst['grad']:.1e}", f"{ratio_lo:.6f}–{ratio_hi:.6f}",
                                 f"{nonsp['loss']:.0e} / {nonsp['logits']:.0e} / {nonsp['grad']:.0e}", status])
                    run.results.setdefault("parity", []).append({"case": name, "sp": sp, "status": status,
                                                                 "sp_errors": worst, "nonsp_errors": nonsp})


def section_offload(run: Run) -> list[list[Any]]:
    """offload_params=True vs False in the Lightning strategy on one device: same losses and weights."""
    rows = []
    runs = {}
    for offload in (False, True):
        res, err = run.case(f"strategy offload_params={offload}", _offload_worker, 1,
                            {"offload": offload, "clip": 1.0}, timeout=180, backend=None)
        runs[offload] = res[0] if res else err
    base, off = runs[False], runs[True]
    if isinstance(base, str) or isinstance(off, str):
        status = base if isinstance(base, str) else off
        rows.append(["UlyssesFSDPStrategy(sp=1), AdamW, grad clip 1.0, 3 steps", "", "", "", "", status])
    else:
        loss_err = max(abs(a - b) / abs(b) for a, b in zip(off["losses"], base["losses"]))
        w_err = max(_rel(off["state"][k], v) for k, v in base["state"].items())
        on_host = off["devices"].get("param") == "cpu" and off["devices"].get("grad") == "cpu" and \
            off["opt_devices"] in ([], ["cpu"])
        status = "PASS" if loss_err <= 1e-5 and w_err <= 1e-5 and on_host else \
            f"FAIL: loss {loss_err:.1e}, weights {w_err:.1e}, on host {on_host}"
        rows.append(["UlyssesFSDPStrategy(sp=1), AdamW, grad clip 1.0, 3 steps", f"{loss_err:.1e}", f"{w_err:.1e}",
                     f"param {off['devices'].get('param')}, grad {off['devices'].get('grad')}, "
                     f"optimizer state {','.join(off['opt_devices']) or '-'}",
                     f"{base['time']:.1f} / {off['time']:.1f}", status])
    run.results["offload"] = rows
    return rows


def _fmt_mib(b: int | None) -> str:
    """Bytes as MiB for a table cell, ``n/a`` when not measured."""
    return "n/a" if b is None else f"{b / MIB:.0f}"


def section_tiled(run: Run) -> list[list[Any]]:
    """Rows of the tiled table: each group's untiled case first, the ratios against it."""
    s = run.s
    rows = []
    groups = (("lm-loss", f"LM loss (seq {s.tile_seq}, hidden {s.tile_hidden}, vocab {s.tile_vocab})", s.loss_shards),
              ("mlp", f"MLP (seq {s.tile_seq}, hidden {s.tile_hidden}, inter {s.tile_intermediate})", s.mlp_shards))
    for kind, label, shard_list in groups:
        base = None
        for shards in (None, *shard_list):
            res, err = run.case(f"tiled {kind} shards={shards}", _tiled_worker, 1, {"kind": kind, "shards": shards},
                                timeout=120, backend=None)
            tiles = "untiled" if shards is None else str(shards)
            if res is None:
                rows.append([label, tiles, "", "", "", "", err])
                continue
            r = res[0]
            if shards is None:
                base = r
            peak_ratio = (f"{r['peak'] / base['peak']:.2f}" if base and r["peak"] and base["peak"] else "n/a")
            time_ratio = f"{r['time'] / base['time']:.2f}" if base else "n/a"
            rows.append([label, tiles, _fmt_mib(r["peak"]), peak_ratio, f"{r['time'] * 1e3:.1f}", time_ratio, "ok"])
    run.results["tiled"] = rows
    return rows


def section_headline(run: Run) -> list[str]:
    """The headline table and the printed derivation of the longest sequence."""
    s = run.s
    out = []
    fits: dict[int, tuple[float, float]] = {}
    raw: dict[int, Any] = {}
    backend = "gloo" if run.device == "cpu" else "cpu:gloo,cuda:nccl"
    rows = []
    for layers in (1, 2):
        res, err = run.case(f"headline {layers} layer(s)", _headline_worker, 1, {"layers": layers}, timeout=240,
                            backend=backend)
        if res is None:
            rows.append([layers, "", "", "", "", "", err])
            continue
        info = res[0]
        raw[layers] = info
        pts = info["points"]
        for p in pts:
            rows.append([layers, p["seq"], _fmt_mib(p["peak"]),
                         "n/a" if p["reserved"] is None else f"{p['reserved'] / MIB:.0f}", f"{p['time']:.2f}",
                         f"{p['loss']:.3f}", "ok"])
        if all(p["peak"] is not None for p in pts):
            fits[layers] = line([(p["seq"], float(p["peak"])) for p in pts])
    run.results["headline"] = {"raw": raw}
    kind = "peak CUDA memory allocated" if run.device == "cuda" else "peak RSS growth (CPU, indicative)"
    shape = "tiny stand-in for the Llama-3-8B shape" if run.args.dry_run else "Llama-3-8B-shaped model"
    out.append(f"{shape} (hidden {s.hl_hidden}, {s.hl_heads}/{s.hl_kv_heads} heads, intermediate "
               f"{s.hl_intermediate}, vocab {s.hl_vocab}), {s.hl_dtype} compute, batch 1, sdpa; FSDP2 CPUOffloadPolicy "
               "(params, grads, AdamW state on the host), checkpointed layers with inputs offloaded, tiled loss "
               f"(tile {s.hl_loss_tile_bytes / MIB:g} MiB of fp32 logits) and tiled MLPs ('auto'). Memory: {kind}.")
    out.append("")
    out.append(table(["decoder layers", "seq", "peak MiB", "max reserved MiB", "fwd+bwd s", "loss", "status"], rows))
    if raw:
        any_info = next(iter(raw.values()))
        out.append("")
        out.append(f"Parameters on {', '.join(any_info['param_devices'])}, gradients on "
                   f"{', '.join(any_info['grad_devices']) or '-'} after backward; the AdamW step ran on the host in "
                   f"{any_info['opt_s']:.1f} s ({any_info['params'] / 1e9:.2f} B parameters).")
    if set(fits) == {1, 2}:
        if run.device == "cuda":
            info = raw[2]
            overhead = info["total"] - info["free"] - info["reserved_now"]  # CUDA context and other processes
            capacity = info["total"] - overhead
            cap_text = (f"{capacity / GIB:.1f} GiB = the GPU's {info['total'] / GIB:.1f} GiB minus "
                        f"{overhead / GIB:.1f} GiB held outside PyTorch's allocator (CUDA context)")
        else:
            capacity = 2 * GIB  # a stand-in budget that exercises the arithmetic in the dry run
            cap_text = "2 GiB (a stand-in budget: the dry run only exercises the arithmetic)"
        est = headline_estimate(fits, s.hl_full_layers, capacity)
        # an 80 GB H100 reports 81559 MiB; the same non-PyTorch overhead as measured here (none on CPU)
        overhead_h100 = info["total"] - capacity if run.device == "cuda" else 0
        h100 = headline_estimate(fits, s.hl_full_layers, 81559 * MIB - overhead_h100)
        host_ckpt = s.hl_full_layers * s.hl_hidden * 2  # bf16 checkpointed input per layer and token
        run.results["headline"].update(estimate=est, capacity=capacity, h100=h100)
        out.append("")
        out.append("Derivation. peak(L, s) = a_L + b_L·s through the two lengths of each layer count:")
        out.append(f"- 1 layer: a_1 = {est['a1'] / GIB:.2f} GiB, b_1 = {est['b1'] / 1024:.1f} KiB/token; 2 layers: "
                   f"a_2 = {est['a2'] / GIB:.2f} GiB, b_2 = {est['b2'] / 1024:.1f} KiB/token.")
        out.append(f"- one more decoder layer adds {est['da'] / MIB:.0f} MiB fixed and {est['db'] / 1024:.2f} "
                   "KiB/token (negative increments are counted as 0; expected near 0 on a GPU, where a checkpointed "
                   "layer's input waits on the host; on CPU, offload moves host to host and saves nothing).")
        out.append(f"- {s.hl_full_layers} layers: a = a_2 + {s.hl_full_layers - 2}·Δa = {est['a'] / GIB:.2f} GiB, "
                   f"b = b_2 + {s.hl_full_layers - 2}·Δb = {est['b'] / 1024:.1f} KiB/token.")
        out.append(f"- usable memory C = {cap_text}.")
        out.append(f"- **longest sequence = (C − a) / b ≈ {est['max_seq']:,.0f} tokens** on this device (linear "
                   "extrapolation from the measured lengths; attention memory is linear in s with the fused sdpa "
                   "kernels; allocator fragmentation at that length is not included — compare the reserved column).")
        if run.device == "cuda":  # in a dry run the stand-in shapes make this figure meaningless
            out.append(f"- the same arithmetic for an 80 GB H100 (C = its 81559 MiB minus the same overhead) gives "
                       f"≈ {h100['max_seq']:,.0f} tokens; ALST reports 500K tokens for Llama-8B on one 80 GB H100.")
        out.append("- the host must hold the float32 parameters, gradients and AdamW moments (16 bytes per "
                   f"parameter) plus the offloaded layer inputs, {host_ckpt / 1024:.1f} KiB per token for "
                   f"{s.hl_full_layers} layers "
                   f"(≈ {host_ckpt * est['max_seq'] / GIB:,.0f} GiB at that length).")
    elif raw:
        out.append("")
        out.append("No estimate: a layer count is missing or its peaks could not be measured.")
    return out


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


SECTIONS = ("parity", "offload", "tiled", "headline", "flex")


def main(argv: list[str] | None = None) -> int:
    """Run the sections, print the tables; 0 when the run completed (rows may still FAIL), 2 when it could not start."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: exercises every section (CI)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run; cases that no longer fit are skipped (default: 450 on "
                             "the GPU, 300 in a dry run)")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS,
                        help="what to run; 'flex' is the flex_attention part of the parity table, run last")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process")
    parser.add_argument("--json", default=None, help="also write every result to this file")
    args = parser.parse_args(argv)
    if args.budget is None:
        args.budget = 300.0 if args.dry_run else 450.0
    if args.threads is None:
        args.threads = 1 if args.dry_run else max(1, (os.cpu_count() or 4) // 4)
    try:
        mp.get_context("fork")
    except ValueError:
        print("gpu_check needs the fork start method (Linux).", file=sys.stderr)
        return 2
    preload()
    # an outer `timeout` sends SIGTERM: unwind through launch()'s cleanup so no rank outlives the run
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        return _run(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    """The body of :func:`main` once the arguments are known."""
    run = Run(args)
    out = section_env(run)
    env = run.results["env"]
    if not args.dry_run and "gpu" not in env:
        print("\n".join(out))
        print("\nNo CUDA GPU visible: nothing to check (use --dry-run on a CPU machine).")
        return 2
    if any(str(v).startswith("IMPORT FAILED") for v in env["versions"].values()):
        print("\n".join(out))
        print("\nA required package does not import with these versions; see the versions line.")
        return 2

    # Run in order of importance, so a short budget loses the least; print in reading order, also what
    # was finished when an outer timeout stops the run.
    parity: list[list[Any]] = []
    tiled: list[list[Any]] = []
    headline: list[str] = []
    offload: list[list[Any]] = []
    try:
        if "parity" in args.sections:
            section_parity(run, ("sdpa",), parity)
        if "tiled" in args.sections:
            tiled = section_tiled(run)
        if "headline" in args.sections:
            headline = section_headline(run)
        if "offload" in args.sections:
            offload = section_offload(run)
        if "flex" in args.sections:
            section_parity(run, ("flex_attention",), parity)
    finally:
        report(run, out, parity, offload, tiled, headline)
    return 0


def report(run: Run, out: list[str], parity: list[list[Any]], offload: list[list[Any]], tiled: list[list[Any]],
           headline: list[str]) -> None:
    """Print the tables in reading order and write the JSON."""
    args, s = run.args, run.s
    if parity:
        out += ["", f"## 1. SP parity on {run.device}: 4 ranks on one device, gloo with {run.device} tensors",
                "",
                f"Llama (Mistral for the sliding window {s.window}), hidden {s.hidden}, {s.heads}/{s.kv_heads} heads "
                f"(head dim {s.head_dim}), {s.layers} layers, vocab {s.vocab}, batch {s.batch}, seq {s.seq}; one "
                "forward + backward. Errors are relative (‖x − ref‖/‖ref‖) to the same model without SP in "
                "float32 sdpa: worst over ranks (logits on real tokens, gradients summed over the SP group / sp, worst "
                "parameter). bf16 = autocast. PASS: SP's errors ≤ max(floor, 2 × the error of the same backend and "
                f"dtype without SP, counted up to {CAP['fp32']:g} / {CAP['bf16']:g}), floor {FLOOR['fp32']:g} (fp32) / "
                f"{FLOOR['bf16']:g} (bf16), and every SP rank "
                "has the same loss.",
                "",
                table(["attention", "dtype", "mask", "sp", "loss err", "logits err", "grad err", "grad ratio range",
                       "without SP: loss / logits / grad err", "status"], parity)]
    if offload:
        out += ["", "### UlyssesFSDPStrategy(offload_params=True) vs offload_params=False, one device", "",
                table(["run", "max loss rel diff", "weights rel diff", "where the state lives (offload run)",
                       "fit s (off / on)", "status"], offload)]
    if tiled:
        note = "torch.cuda.max_memory_allocated above inputs and weights" if run.device == "cuda" else \
            "peak RSS growth above inputs and weights (CPU, indicative)"
        out += ["", f"## 2. Tiled loss and tiled MLP on {run.device} ({s.tile_dtype}): one forward + backward, "
                f"best of {s.repeats}; peak = {note}", "",
                table(["case", "tiles", "peak MiB", "peak ratio", "time ms", "time ratio", "status"], tiled)]
    if headline:
        out += ["", "## 3. Memory headline: the ALST recipe on one device", ""] + headline
    total = time.monotonic() - run.started
    out += ["", f"total runtime {total:.0f} s (budget {args.budget:.0f} s)"]
    print("\n".join(out), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(run.results, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())

"""Throughput under sequence parallelism, with the numbers meaning what they mean under DDP.

Lightning's ``ThroughputMonitor`` counts every rank as a replica holding whole samples and reports
global = device × world, and no global numbers at all when the world is one "replica". Under SP a
rank holds ``1/sp`` of each of its group's samples, and only ``dp`` groups see distinct samples.
:class:`UlyssesThroughputMonitor` counts the job instead (see docs/throughput.md):

* global ``batches_per_sec`` / ``samples_per_sec`` / ``items_per_sec`` / ``flops_per_sec``: distinct
  batches, samples, tokens and FLOPs of the whole job per second — ``dp`` batches per step;
* ``device/*``: this device's share, global / world; ``device/items_per_sec`` is exactly the tokens
  this device holds per second, and ``device/mfu`` its FLOP/s over its peak.

It is built on Lightning's public :class:`~lightning.fabric.utilities.throughput.Throughput` (fed
job-wide counts) and logs through the trainer's loggers. Without SP (``sp = 1``, or a stage that
bypasses SP) the numbers are those of ``ThroughputMonitor``, global metrics included for one device.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.throughput import Throughput, get_available_flops
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_only, rank_zero_warn

_RATES = ("batches", "samples", "items", "flops")


@dataclass
class _Stage:
    throughput: Throughput
    t0: float = 0.0
    batches: int = 0
    samples: int = 0
    lengths: int = 0
    logged: int = 0  # eval stages log every batch, numbered from 1


def _compute_dtype(precision: str) -> torch.dtype:
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    if precision.startswith("64"):
        return torch.float64
    return torch.float32


def parallel_degrees(trainer: pl.Trainer) -> tuple[int, int]:
    """``(sp, world)`` for the running stage: ``sp = 1`` unless it shards sequences over SP groups."""
    strategy = trainer.strategy
    sharded = getattr(strategy, "sequences_sharded", False)
    return (strategy.sp_size if sharded else 1), trainer.world_size


class UlyssesThroughputMonitor(pl.Callback):
    """Log throughput — global: distinct samples and tokens of the whole job; device: this device's share.

    A drop-in for Lightning's ``ThroughputMonitor`` (same arguments, same metric names, logged under
    ``train/``, ``validate/``, ``test/`` and ``predict/`` at the trainer's ``log_every_n_steps``) that
    is right under SP. Counted on global rank 0, assuming every DP group runs the same batch sizes
    (as ``ThroughputMonitor`` assumes of every device).

    Args:
        batch_size_fn: samples in a batch, given the batch this rank receives (under SP: its chunk of
            the full-length batch, which has the same number of samples).
        length_fn: tokens in the batch this rank receives (under SP: its chunk, ``seq / sp`` per row,
            SP padding included when it counts every position, e.g. ``input_ids.numel()``); ``None``
            logs no item rates.
        available_flops: peak FLOP/s of one device for ``device/mfu``; default: Lightning's table for
            the device and the trainer's precision (``None`` on CPUs).
        window_size: updates in the rolling average (at least 2). Rates exist only once the window is
            full: the first training rates are logged at the first logging step at or after
            ``window_size`` batches (a warning says so at the start of a ``fit`` whose ``max_steps`` is
            shorter). Lightning's default of 100 suits long runs; a short run wants e.g. 5.
        separator: between the stage, ``device`` and the metric name.
        prog_bar: also show the training rates named here (without the ``train/`` prefix, e.g.
            ``["items_per_sec"]``; ``True``: ``items_per_sec``, or ``samples_per_sec`` without
            ``length_fn``) in the progress bar, under their logged names, at every logging step.

    A LightningModule attribute ``flops_per_batch`` is read as the FLOPs of one full-length batch as
    measured without SP (``measure_flops`` on the unsharded model and batch): each DP group spends that
    per batch, each device ``1/sp`` of it.
    """

    def __init__(self, batch_size_fn: Callable[[Any], int], length_fn: Callable[[Any], int] | None = None,
                 available_flops: float | None = None, window_size: int = 100, separator: str = "/",
                 prog_bar: bool | Sequence[str] = False) -> None:
        if window_size < 2:
            raise ValueError(f"window_size must be at least 2 (a rate needs two updates), got {window_size}.")
        if prog_bar is True:
            prog_bar = ["items_per_sec" if length_fn is not None else "samples_per_sec"]
        self.prog_bar = list(prog_bar or [])
        self.batch_size_fn = batch_size_fn
        self.length_fn = length_fn
        self.available_flops = available_flops
        self.window_size = window_size
        self.separator = separator
        self._peak: float | None = None
        self._stages: dict[RunningStage, _Stage] = {}
        self._warned_flops = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._peak = self.available_flops
        if self._peak is None:
            self._peak = get_available_flops(trainer.strategy.root_device, _compute_dtype(str(trainer.precision)))

    # -- counting -----------------------------------------------------------------------------

    def _start(self, trainer: pl.Trainer) -> None:
        stage = trainer.state.stage
        if stage not in self._stages or trainer.state.fn == TrainerFn.FITTING:
            # The job-wide counts go into a one-"device" Throughput: its device rates are the job's.
            self._stages[stage] = _Stage(Throughput(window_size=self.window_size, separator=self.separator))
        self._stages[stage].t0 = time.perf_counter()

    @torch.inference_mode()  # in case batch_size_fn or length_fn computes grads
    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        state = self._stages[trainer.state.stage]
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - state.t0
        sp, world = parallel_degrees(trainer)
        dp = world // sp
        state.batches += dp
        state.samples += self.batch_size_fn(batch) * dp
        if self.length_fn is not None:
            state.lengths += self.length_fn(batch) * world  # every device holds distinct tokens
        flops = getattr(pl_module, "flops_per_batch", None)
        if flops is None and not self._warned_flops:
            self._warned_flops = True
            rank_zero_warn(f"UlyssesThroughputMonitor logs no FLOP rates or MFU: {type(pl_module).__name__} has no "
                           "`flops_per_batch` (the FLOPs of one full-length batch, measured without SP).")
        state.throughput.update(time=elapsed, batches=state.batches, samples=state.samples,
                                lengths=state.lengths if self.length_fn is not None else None,
                                flops=None if flops is None else flops * dp)

    def compute(self, trainer: pl.Trainer) -> dict[str, float]:
        """The metrics of the running stage so far (logged by the hooks; empty until the window fills)."""
        state = self._stages[trainer.state.stage]
        _, world = parallel_degrees(trainer)
        job = state.throughput.compute()
        sep = self.separator
        out: dict[str, float] = {"time": job["time"], "batches": job["batches"], "samples": job["samples"]}
        if "lengths" in job:
            out["lengths"] = job["lengths"]
        for name in _RATES:
            rate = job.get(f"device{sep}{name}_per_sec")
            if rate is None:
                continue
            out[f"{name}_per_sec"] = rate
            out[f"device{sep}{name}_per_sec"] = rate / world
            if name == "flops" and self._peak:
                out[f"device{sep}mfu"] = rate / world / self._peak
        stage = trainer.state.stage
        return {f"{stage.value}{sep}{k}": v for k, v in out.items()}

    def _log(self, trainer: pl.Trainer, step: int, pl_module: pl.LightningModule | None = None) -> None:
        metrics = self.compute(trainer)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        if pl_module is not None:
            stage = trainer.state.stage.value
            for name in self.prog_bar:
                key = f"{stage}{self.separator}{name}"
                if key in metrics:  # rank 0 alone counts: rank_zero_only tells Lightning not to expect peers
                    pl_module.log(key, metrics[key], prog_bar=True, logger=False, on_step=True, on_epoch=False,
                                  rank_zero_only=True, batch_size=1)

    def _warn_short_window(self, trainer: pl.Trainer) -> None:
        batches = trainer.max_steps * trainer.accumulate_grad_batches
        if 0 < batches < self.window_size:
            rank_zero_warn(f"UlyssesThroughputMonitor(window_size={self.window_size}) needs {self.window_size} "
                           f"training batches before its first rate, and this fit stops after {batches} "
                           f"(max_steps={trainer.max_steps}): no training rate will be logged. Pass a smaller "
                           "window_size (e.g. 5) for a short run.")

    # -- hooks (rank 0 counts and logs, as ThroughputMonitor does) ----------------------------

    @rank_zero_only
    def on_train_start(self, trainer: pl.Trainer, *_: Any) -> None:
        self._warn_short_window(trainer)
        self._start(trainer)

    @rank_zero_only
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           *_: Any) -> None:
        self._update(trainer, pl_module, batch)
        steps = trainer.fit_loop.total_batch_idx + 1
        if steps % trainer.accumulate_grad_batches == 0 and trainer.global_step % trainer.log_every_n_steps == 0:
            self._log(trainer, trainer.global_step, pl_module)

    @rank_zero_only
    def on_validation_start(self, trainer: pl.Trainer, *_: Any) -> None:
        if not trainer.sanity_checking:
            self._start(trainer)

    @rank_zero_only
    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, *_: Any) -> None:
        if not trainer.sanity_checking:
            self._eval_batch(trainer, pl_module, batch)

    @rank_zero_only
    def on_validation_end(self, trainer: pl.Trainer, *_: Any) -> None:
        train = self._stages.get(RunningStage.TRAINING)
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING or train is None:
            return
        # Training rates exclude the validation pause: move the training clock's origin past it.
        train.t0 += time.perf_counter() - self._stages[RunningStage.VALIDATING].t0

    @rank_zero_only
    def on_test_start(self, trainer: pl.Trainer, *_: Any) -> None:
        self._start(trainer)

    @rank_zero_only
    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, *_: Any) -> None:
        self._eval_batch(trainer, pl_module, batch)

    @rank_zero_only
    def on_predict_start(self, trainer: pl.Trainer, *_: Any) -> None:
        self._start(trainer)

    @rank_zero_only
    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, *_: Any) -> None:
        self._eval_batch(trainer, pl_module, batch)

    def _eval_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        self._update(trainer, pl_module, batch)
        state = self._stages[trainer.state.stage]
        state.logged += 1
        self._log(trainer, state.logged)

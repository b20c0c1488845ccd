"""UlyssesThroughputMonitor: every logged number against a hand count, for sp = 1, 2 and 4 on 4 ranks.

Rates are checked as counts per logged interval: with a window of 2 updates, a rate times the time
between two consecutive logs is what the job (or the device) processed in that step.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.loggers.logger import Logger

from lightning_ulysses import UlyssesStrategy, UlyssesThroughputMonitor
from tests.distributed import run_distributed
from tests.lightning_setup import LM, Samples, loader, trainer_kwargs

SEQ, FLOPS, PEAK = 32, 1000, 1e6


class Captured(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.logged: list[tuple[int, dict]] = []

    @property
    def name(self) -> str:
        return "captured"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.logged.append((step, dict(metrics)))


class FlopsLM(LM):
    flops_per_batch = FLOPS  # one full-length batch, as measured without SP

    def training_step(self, batch, batch_idx):
        self.local_tokens = batch["input_ids"].numel()
        return super().training_step(batch, batch_idx)


def _run(rank, world, sp):
    logger = Captured()
    monitor = UlyssesThroughputMonitor(batch_size_fn=lambda b: b["input_ids"].shape[0],
                                       length_fn=lambda b: b["input_ids"].numel(), available_flops=PEAK,
                                       window_size=2)
    trainer = pl.Trainer(strategy=UlyssesStrategy(sp=sp), max_steps=3, callbacks=[monitor], log_every_n_steps=1,
                         **trainer_kwargs(logger=logger))
    lm = FlopsLM()
    trainer.fit(lm, train_dataloaders=loader(Samples(8, SEQ)))
    trainer.validate(lm, dataloaders=loader(Samples(12, SEQ)), verbose=False)
    return [(step, m) for step, m in logger.logged if any(k.startswith(("train/", "validate/")) for k in m)], \
        lm.local_tokens


def _check_stage(logged, prefix, world, sp):
    dp = world // sp
    rows = [m for _, m in logged if f"{prefix}/time" in m]
    assert len(rows) >= 3, rows
    for k, (before, now) in enumerate(zip(rows, rows[1:]), start=2):
        m = {key[len(prefix) + 1:]: v for key, v in now.items()}
        dt = m["time"] - before[f"{prefix}/time"]
        # job totals after k updates: dp batches of one sample of SEQ tokens per step
        assert (m["batches"], m["samples"], m["lengths"]) == (dp * k, dp * k, dp * SEQ * k)
        per_step = {  # hand counts of one step
            "batches_per_sec": dp, "samples_per_sec": dp, "items_per_sec": dp * SEQ, "flops_per_sec": dp * FLOPS,
            # this device: its share of the job; its own tokens; 1/sp of each of its group's batches
            "device/batches_per_sec": 1 / sp, "device/samples_per_sec": 1 / sp,
            "device/items_per_sec": SEQ / sp, "device/flops_per_sec": FLOPS / sp,
        }
        got = {key: m[key] * dt for key in per_step}
        assert got == pytest.approx(per_step, rel=1e-9), (prefix, k)
        assert m["device/mfu"] == pytest.approx(m["device/flops_per_sec"] / PEAK, rel=1e-12)


@pytest.mark.parametrize("sp", [1, 2, 4])
def test_throughput_matches_hand_counts(sp):
    logged, local_tokens = run_distributed(_run, 4, sp)[0]  # rank 0 counts and logs
    assert local_tokens == SEQ // sp  # what device/items_per_sec counts: this device's tokens
    _check_stage(logged, "train", 4, sp)
    _check_stage(logged, "validate", 4, sp)


def _stock(rank, world):
    monitor = ThroughputMonitor(batch_size_fn=lambda b: b["input_ids"].shape[0])
    trainer = pl.Trainer(strategy=UlyssesStrategy(sp=2), max_steps=1, callbacks=[monitor], **trainer_kwargs())
    with pytest.raises(ValueError, match="UlyssesThroughputMonitor"):
        trainer.fit(LM(), train_dataloaders=loader(Samples(8, 16)))
    return True


def test_stock_throughput_monitor_is_refused_under_sp():
    run_distributed(_stock, 4)


class BarLM(LM):
    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.bar = dict(self.trainer.progress_bar_metrics)


def _progress_bar(rank, world, window):
    import warnings

    monitor = UlyssesThroughputMonitor(batch_size_fn=lambda b: b["input_ids"].shape[0],
                                       length_fn=lambda b: b["input_ids"].numel(), window_size=window, prog_bar=True)
    trainer = pl.Trainer(strategy=UlyssesStrategy(sp=2), max_steps=4, callbacks=[monitor], log_every_n_steps=2,
                         **trainer_kwargs(devices=2))
    lm = BarLM()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer.fit(lm, train_dataloaders=loader(Samples(8, SEQ)))
    short = [str(w.message) for w in seen if "no training rate will be logged" in str(w.message)]
    return lm.bar, short


def test_throughput_in_the_progress_bar_and_a_window_longer_than_the_run_is_named():
    bar, short = run_distributed(_progress_bar, 2, 2)[0]
    # rank 0 shows the job's tokens/s under the name it logs
    assert bar["train/items_per_sec"] > 0 and short == []
    bar, short = run_distributed(_progress_bar, 2, 10)[0]  # 10 updates needed, 4 steps run
    assert "train/items_per_sec" not in bar and len(short) == 1 and "window_size=10" in short[0]

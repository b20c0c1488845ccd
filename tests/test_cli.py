"""The example through LightningCLI: YAML config, default (script) launcher, in a subprocess."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

from tests.distributed import _DIST_ENV, free_port

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--trainer.devices=2", "--trainer.max_steps=2", "--data.seq_len=64", "--data.train_rows=4",
         "--data.val_rows=0", "--model.config={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, "
         "num_attention_heads: 4, num_key_value_heads: 2}", "--trainer.callbacks.init_args.window_size=2",
         "--trainer.log_every_n_steps=1"]


def _run(*args: str, script: str = "examples/train.py") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env["MASTER_PORT"] = str(free_port())
    env["COLUMNS"] = "200"  # the progress bar's width: its metrics on one line, none cut short
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli_fit_from_yaml_through_script_launcher():
    res = _run("fit", "--config", "examples/configs/cpu_tiny.yaml", "--trainer.strategy.init_args.sp=2",
               "--trainer.strategy.init_args.overlap_chunks=2", *SMALL)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout + res.stderr
    assert "Starting with 2 processes" in out  # the script launcher started a second one
    # Lightning's progress bar: this step's loss, its running mean, and the job's tokens/s from the monitor
    assert "train_loss" in out and "loss_avg" in out and "train/items_per_sec" in out, out[-3000:]
    assert "PrintProgress" not in out and "no training rate will be logged" not in out


def test_quick_start_shows_throughput_within_its_run():
    """The quick start's monitor window fits its run: the first rates come before its last step."""
    import yaml

    cfg = yaml.safe_load((ROOT / "examples" / "configs" / "cpu_tiny.yaml").read_text())
    monitor = next(c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("UlyssesThroughputMonitor"))
    window, every = monitor["init_args"]["window_size"], cfg["trainer"]["log_every_n_steps"]
    first_log = -(-window // every) * every  # the first logging step with a full window
    assert first_log <= cfg["trainer"]["max_steps"] // 2, (window, every)
    assert monitor["init_args"]["prog_bar"] and cfg["trainer"].get("enable_progress_bar", True)


def test_cli_strategy_by_registered_name():
    res = _run("fit", "--config", "examples/configs/cpu_tiny.yaml", "--trainer.strategy=ulysses_sp2", *SMALL)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "train_loss" in res.stdout + res.stderr


def test_vlm_example_trains_with_images(tmp_path):
    """The Qwen2-VL example (text rows with synthetic images, some rows and batches without) for a few
    steps on 2 processes, sp=2, with validation; the loss it logs goes down."""
    import csv

    res = _run("fit", "--config", "examples/configs/qwen2_vl_tiny.yaml", "--trainer.devices=2",
               "--trainer.max_steps=3", "--trainer.val_check_interval=3", "--data.seq_len=256",
               "--data.train_rows=8", "--data.val_rows=2", "--trainer.log_every_n_steps=1",
               "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
               f"--trainer.logger.init_args.save_dir={tmp_path}", script="examples/train_vlm.py")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["train_loss"]) for r in rows if r.get("train_loss")]
    assert len(losses) == 3 and losses[-1] < losses[0], rows
    assert any(r.get("val_loss") for r in rows), rows


def test_cli_help_shows_strategy_arguments_not_ddp_internals():
    res = _run("fit", "--trainer.strategy.help", "lightning_ulysses.UlyssesStrategy")
    assert res.returncode == 0, res.stderr[-3000:]
    text = res.stdout
    # some jsonargparse versions spell the options --trainer.strategy.init_args.NAME; both are accepted
    text = text.replace("--trainer.strategy.init_args.", "--trainer.strategy.")
    assert "--trainer.strategy.sp SP" in text and "--trainer.strategy.eval_mode" in text
    assert "--trainer.strategy.overlap_chunks" in text
    for internal in ("ddp_comm_hook", "ddp_comm_state", "model_averaging_period", "parallel_devices",
                     "cluster_environment"):
        assert internal not in text, internal


def test_gpu_config_parses():
    """The 8-GPU config cannot run here, but every key in it must be valid for the CLI."""
    res = _run("fit", "--config", "examples/configs/llama8b_8gpu.yaml", "--print_config")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "lightning_ulysses.UlyssesFSDPStrategy" in res.stdout and "TiledLossCallback" in res.stdout


def _undocumented(cls: type) -> list[str]:
    """Arguments of ``cls`` that the CLI would list without a description (jsonargparse reads the
    Google-style ``Args:`` section of the docstring, one name per entry)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(cls, "x")
    args = [a for a in parser._actions if a.dest.startswith("x.")]
    assert args, f"no arguments found for {cls.__name__}"
    own = set(inspect.signature(cls.__init__).parameters)  # not what **kwargs forwards to torch
    return [a.dest[2:] for a in args
            if a.dest[2:] in own and (not (a.help or "").strip() or a.help.startswith("(type:"))]


def test_every_strategy_and_example_argument_is_documented():
    import importlib.util

    from lightning_ulysses import (PositionalLossCallback, TiledLossCallback, UlyssesFabricStrategy,
                                   UlyssesFSDPFabricStrategy, UlyssesFSDPStrategy, UlyssesStrategy,
                                   UlyssesThroughputMonitor)

    spec = importlib.util.spec_from_file_location("example_train", ROOT / "examples" / "train.py")
    example = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = example  # jsonargparse resolves the annotations through the module
    spec.loader.exec_module(example)
    for cls in (UlyssesStrategy, UlyssesFSDPStrategy, UlyssesFabricStrategy, UlyssesFSDPFabricStrategy, TiledLossCallback, PositionalLossCallback,
                UlyssesThroughputMonitor,
                example.CausalLM, example.TextData):
        assert _undocumented(cls) == [], cls.__name__
    path = list(sys.path)
    try:  # train_vlm puts its folder on sys.path to import train's tokenizer and callback
        spec = importlib.util.spec_from_file_location("example_train_vlm", ROOT / "examples" / "train_vlm.py")
        vlm = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = vlm
        spec.loader.exec_module(vlm)
    finally:
        sys.path[:] = path
    for cls in (vlm.VisionLanguageLM, vlm.ImageTextData):
        assert _undocumented(cls) == [], cls.__name__


def test_example_has_one_way_to_configure_the_optimizer():
    res = _run("fit", "--help")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "--model.optimizer" in res.stdout and "--model.lr" in res.stdout
    assert "--optimizer" not in res.stdout.replace("--model.optimizer", "")
    assert "--lr_scheduler" not in res.stdout

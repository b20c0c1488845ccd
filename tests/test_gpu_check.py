"""benchmarks/gpu_check.py: its dry run on CPU passes every section, and its verdicts and arithmetic are right.

The script is meant to run once, unattended, on a GPU machine; these tests keep it from rotting: the
dry run exercises every code path with tiny shapes (gloo, CPU), and the pieces that decide what the
tables say (the PASS rule, the headline derivation, the crash- and hang-proof launcher) are checked
on cases whose answer is known.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # fork-started workers pickle nothing by name, but keep it findable
    spec.loader.exec_module(module)
    return module


gpu_check = _load()


@pytest.mark.timeout(1800)  # the same bound as its --budget: ~1 min idle, several on a loaded machine
def test_dry_run_passes_every_section(tmp_path, capsys):
    out_json = tmp_path / "result.json"
    # a budget no loaded CI machine runs out of (~1 min when idle): every case must run, none be skipped
    assert gpu_check.main(["--dry-run", "--budget", "1800", "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    res = json.loads(out_json.read_text())

    parity = res["parity"]
    sdpa = [c for c in parity if c["case"].startswith("parity sdpa")]
    assert len(sdpa) == 2 * 4 * 2  # fp32 and bf16, four masks, sp 2 and 4
    assert all(c["status"] == "PASS" for c in sdpa), [c for c in sdpa if c["status"] != "PASS"]
    fp32 = [c for c in sdpa if " fp32 " in c["case"]]
    assert max(max(c["sp_errors"].values()) for c in fp32) <= 1e-5
    flex = [c for c in parity if c["case"].startswith("parity flex_attention")]
    assert len(flex) == 2 * 4  # bf16 and fp32, four masks (one record per case when it cannot run)
    if res["flex_train"] is None:  # a torch that trains flex on CPU: the cases must then really pass
        assert all(c["status"] == "PASS" for c in flex)
    else:
        assert "backward on CPU" in res["flex_train"]
        assert all(c["status"] == gpu_check.CPU_FLEX_NA for c in flex)

    assert res["collectives"] == {"all_to_all_single (functional)": True, "all_reduce": True, "all_gather": True,
                                  "device": "cpu"}
    (offload_row,) = res["offload"]
    assert offload_row[-1] == "PASS", offload_row
    assert "param cpu, grad cpu" in offload_row[3]

    tiled = res["tiled"]
    assert len(tiled) == 6 and all(row[-1] == "ok" for row in tiled), tiled
    assert all(row[2] != "n/a" for row in tiled)  # the CPU memory measure worked on Linux

    head = res["headline"]
    assert set(head["raw"]) == {"1", "2"}
    assert head["estimate"]["b"] > 0 and head["estimate"]["max_seq"] > 0
    assert all(d == "cpu" for info in head["raw"].values() for d in info["param_devices"] + info["grad_devices"])

    for title in ("## 1. SP parity", "### UlyssesFSDPStrategy(offload_params=True)", "## 2. Tiled loss",
                  "## 3. Memory headline", "longest sequence"):
        assert title in printed


def test_judge_rejects_what_parity_must_catch():
    ok = {"loss": 1e-7, "logits": 1e-7, "grad": 2e-7, "ratio_lo": 1 - 1e-7, "ratio_hi": 1 + 1e-7}
    nonsp = {"loss": 0.0, "logits": 0.0, "grad": 0.0, "ratio_lo": 1.0, "ratio_hi": 1.0}
    assert gpu_check.judge(ok, nonsp, "fp32", True) == "PASS"
    assert gpu_check.judge({**ok, "ratio_hi": 2.0}, nonsp, "fp32", True).startswith("FAIL: gradient ratio")
    assert gpu_check.judge({**ok, "grad": 3e-5}, nonsp, "fp32", True).startswith("FAIL: grad error")
    assert gpu_check.judge(ok, nonsp, "fp32", False) == "FAIL: SP ranks disagree on the loss"
    # bf16: bounded by twice the error the same dtype has without SP
    noisy = {"loss": 2e-3, "logits": 5e-3, "grad": 9e-3, "ratio_lo": 0.998, "ratio_hi": 1.001}
    sp = {**noisy, "grad": 1.5e-2}
    assert gpu_check.judge(sp, noisy, "bf16", True) == "PASS"
    assert gpu_check.judge({**sp, "grad": 3e-2}, noisy, "bf16", True).startswith("FAIL: grad error")
    assert gpu_check.judge({**sp, "ratio_lo": 0.5}, noisy, "bf16", True).startswith("FAIL: gradient ratio")
    # a reference that is itself off (a backend ignoring a mask without SP) does not loosen the bound
    broken = {"loss": 0.5, "logits": 0.5, "grad": 0.5, "ratio_lo": 0.5, "ratio_hi": 1.5}
    assert gpu_check.judge({**noisy, "grad": 0.2}, broken, "bf16", True).startswith("FAIL: grad error")
    assert gpu_check.judge({**ok, "logits": 3e-5}, broken, "fp32", True).startswith("FAIL: logits error")


def test_headline_arithmetic():
    gib, kib = 2**30, 1024
    # 1 layer: 10 GiB + 40 KiB/token; 2 layers: 10.5 GiB + 42 KiB/token -> 32 layers: 25.5 GiB + 102 KiB/token
    fits = {1: (10 * gib, 40 * kib), 2: (10.5 * gib, 42 * kib)}
    est = gpu_check.headline_estimate(fits, 32, 125.5 * gib)
    assert est["a"] == pytest.approx(25.5 * gib) and est["b"] == pytest.approx(102 * kib)
    assert est["max_seq"] == pytest.approx(100 * gib / (102 * kib))
    # a negative per-layer increment (measurement noise) is not extrapolated as a saving
    est = gpu_check.headline_estimate({1: (10 * gib, 40 * kib), 2: (9 * gib, 39 * kib)}, 32, 20 * gib)
    assert est["a"] == pytest.approx(9 * gib) and est["b"] == pytest.approx(39 * kib)
    assert gpu_check.line([(2048, 3000.0), (1024, 2000.0)]) == pytest.approx((1000.0, 1000.0 / 1024))


def _crash(rank, world):
    if rank == 1:
        os._exit(3)  # dies without a result, as a segfault or an OOM kill would
    return rank


def _hang(rank, world):
    time.sleep(60)


def _ok(rank, world, x):
    return rank * x


def test_launcher_survives_crashes_and_hangs():
    assert gpu_check.launch(_ok, 2, 5, backend=None, timeout=60) == [0, 5]
    t0 = time.monotonic()
    with pytest.raises(gpu_check.CaseError, match="rank 1 died with exit code 3"):
        gpu_check.launch(_crash, 2, backend=None, timeout=60)
    with pytest.raises(gpu_check.CaseError, match="timed out"):
        gpu_check.launch(_hang, 2, backend=None, timeout=3)
    assert time.monotonic() - t0 < 30  # neither waits for the other ranks or for a long join


def test_short_error_keeps_the_cause():
    tb = "Traceback (most recent call last):\n  File x\nNotImplementedError: no | backward\n"
    assert gpu_check.short_error(tb) == "NotImplementedError: no / backward"


def test_gpu_wheels_pins_the_tested_stack_without_torch():
    spec = importlib.util.spec_from_file_location("gpu_wheels", SCRIPT.parent / "gpu_wheels.py")
    wheels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wheels)
    import importlib.metadata as md

    pins = dict(p.split("==") for p in wheels.pins())
    for name in ("transformers", "lightning", "torchmetrics", "huggingface-hub", "tokenizers", "aiohttp"):
        assert pins[name] == md.version(name)  # aiohttp: lightning's fsspec[http], though fsspec is torch's
    assert not {"torch", "numpy", "fsspec", "typing-extensions"} & set(pins)
    assert not [p for p in pins if p.startswith("nvidia")]

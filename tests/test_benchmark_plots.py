"""The benchmark scripts draw their PNGs from a tiny run (memory vs sequence and sp, step time vs sp,
packed vs dense), and ``bench_exchange_layout`` says how far it is."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from tests.distributed import _DIST_ENV

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
TINY_MODEL = ["--hidden", "32", "--layers", "1", "--heads", "4", "--kv-heads", "2", "--intermediate", "64"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _bench(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    res = subprocess.run([sys.executable, script, *args], cwd=BENCH, env=env, capture_output=True, text=True,
                         timeout=240)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res


def _check_png(path: Path) -> None:
    """A well-formed PNG: signature, every chunk's CRC, a sane size, and not one flat colour."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    pos, chunks = 8, []
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, (path, kind)
        chunks.append((kind, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND", path
    width, height = struct.unpack(">II", chunks[0][1][:8])
    assert 300 <= width <= 3000 and 200 <= height <= 2000, (path, width, height)
    pixels = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    assert len(set(pixels[::97])) > 8, f"{path} looks blank"  # axes, lines and text give many byte values


def test_benchmarks_write_their_plots_from_a_tiny_run(tmp_path):
    pytest.importorskip("matplotlib")  # the plots extra (in dev, so CI has it)
    out = str(tmp_path)
    _bench("bench_step.py", "--seq", "64", "128", "--sp", "1", "2", "--steps", "1", "--warmup", "0", "--vocab", "64",
           *TINY_MODEL, "--no-deepspeed", "--plot-dir", out)
    _bench("bench_memory.py", "--seq", "64", "--sp", "1", "2", "--configs", "plain", "--search-configs", "plain",
           "--max-local-seq", "128", "--granule", "32", "--vocab", "256", *TINY_MODEL, "--plot-dir", out)
    res = _bench("bench_patterns.py", "--seq", "256", "--docs", "4", "--window", "64", "--no-step", "--heads", "2",
                 "--kv-heads", "1", "--head-dim", "16", "--in-process", "--plot-dir", out)
    assert "segments+bands" in res.stdout  # the window row ran
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["memory_limits.png", "packed_vs_dense.png", "step_time.png"]
    for name in written:
        _check_png(tmp_path / name)


def test_exchange_layout_benchmark_prints_progress():
    res = _bench("bench_exchange_layout.py", "--seq", "64", "--repeats", "2", "--heads", "2", "--kv-heads", "2",
                 "--head-dim", "8")
    rounds = [line for line in res.stderr.splitlines() if line.strip().startswith("round ")]
    assert len(rounds) == 3 and rounds[-1].strip().startswith("round 2/2"), res.stderr[-2000:]
    assert "| views (current) |" in res.stdout

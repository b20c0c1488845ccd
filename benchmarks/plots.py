"""PNG plots of what the benchmark scripts measured (optional: ``pip install -e ".[plots]"``).

The scripts call these with ``--plot-dir DIR``; each function takes the rows the script printed as a
table and writes one PNG. matplotlib is imported only here, with its file-only ``Agg`` backend (no
display needed), so the scripts run without it unless a plot is asked for.

* :func:`memory_limits` (``bench_memory.py``): per-rank peak vs sequence length for every
  configuration and ``sp``, with the budget, and the longest sequence that fits it vs ``sp``;
* :func:`step_times` (``bench_step.py``): step time vs ``sp`` for every sequence length, against the
  ideal ``1/sp`` of the no-SP step;
* :func:`packed_vs_dense` (``bench_patterns.py``): attention time of the segment path vs the dense
  mask and plain causal attention, per pattern.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

MIB = 2**20


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as error:  # pragma: no cover - exercised where matplotlib is absent
        raise SystemExit('--plot-dir needs matplotlib: pip install -e ".[plots]"') from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plain_ticks(axis: Any) -> None:
    """Log axes labelled 1,024 rather than 1.02 x 10^3 (sequence lengths, sp)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    fig.clf()
    return path


def memory_limits(points: dict[tuple[str, int], list[tuple[int, int]]], limits: dict[tuple[str, int], int | None],
                  budget_bytes: float, path: Path, title: str = "") -> Path:
    """Two panels: peak MiB per rank vs sequence length (log-log), and the longest fitting sequence vs sp.

    Args:
        points: ``{(config, sp): [(seq, peak bytes), ...]}``, every measured point.
        limits: ``{(config, sp): longest fitting seq}`` (``None``: nothing fits); may be empty.
        budget_bytes: the per-rank budget, drawn as a horizontal line.
        path: the PNG to write.
    """
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    configs = sorted({c for c, _ in points})
    styles = dict(zip(configs, ["o-", "s--", "^-.", "d:"]))
    colours = {}
    for (config, sp), pts in sorted(points.items()):
        pts = sorted(set(pts))
        colour = colours.setdefault(sp, f"C{len(colours)}")
        left.plot([s for s, _ in pts], [p / MIB for _, p in pts], styles[config], color=colour,
                  label=f"{config}, sp {sp}", markersize=4)
    left.axhline(budget_bytes / MIB, color="k", linewidth=0.8, linestyle=":", label="budget")
    left.set(xscale="log", yscale="log", xlabel="sequence length (tokens)", ylabel="peak per rank (MiB)",
             title="memory vs sequence length")
    left.legend(fontsize=7)
    _plain_ticks(left.xaxis)
    if limits:
        for config in configs:
            row = sorted((sp, lim) for (c, sp), lim in limits.items() if c == config and lim)
            if row:
                right.plot([sp for sp, _ in row], [lim for _, lim in row], styles[config], label=config)
        right.set_yscale("log", base=2)
        right.set(xscale="log", xlabel="sp", ylabel="longest sequence within budget (tokens)",
                  title=f"memory limit ({budget_bytes / 2**30:g} GiB per rank) vs sp")
        sps = sorted({sp for _, sp in limits})
        right.set_xticks(sps, [str(s) for s in sps])
        right.xaxis.set_minor_formatter(__import__("matplotlib.ticker").ticker.NullFormatter())
        right.legend(fontsize=7)
        _plain_ticks(right.yaxis)
    else:
        right.axis("off")
        right.text(0.5, 0.5, "no search run (--search-configs)", ha="center", va="center")
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def step_times(rows: Sequence[tuple[int, int, float]], path: Path, title: str = "") -> Path:
    """Step time vs sp, one line per sequence length, with the ideal ``t(sp=1) / sp`` dashed.

    Args:
        rows: ``(seq, sp, median step seconds)``.
        path: the PNG to write.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for i, seq in enumerate(sorted({r[0] for r in rows})):
        line = sorted((sp, t) for s, sp, t in rows if s == seq)
        ax.plot([sp for sp, _ in line], [t for _, t in line], "o-", color=f"C{i}", label=f"seq {seq}")
        base = dict(line).get(1)
        if base:
            ax.plot([sp for sp, _ in line], [base / sp for sp, _ in line], ":", color=f"C{i}", linewidth=1)
    sps = sorted({r[1] for r in rows})
    ax.set(xscale="log", yscale="log", xlabel="sp (processes, one torch thread each)", ylabel="step time (s)",
           title="training step time vs sp (dotted: no-SP step / sp)")
    ax.set_xticks(sps, [str(s) for s in sps])
    ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def packed_vs_dense(rows: Sequence[tuple[str, float, float | None, float]], path: Path, title: str = "") -> Path:
    """Grouped bars per pattern: segment path, dense mask (when run) and plain causal attention time.

    Args:
        rows: ``(label, segments s, dense-mask s or None, plain causal s)``, e.g. label ``"16384 packed, 16 docs"``.
        path: the PNG to write.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows) + 2), 4.4))
    width = 0.27
    for k, (name, colour) in enumerate((("segments (default)", "C0"), ("dense mask", "C3"), ("plain causal", "C7"))):
        xs = [i + (k - 1) * width for i, row in enumerate(rows) if row[k + 1] is not None]
        ys = [row[k + 1] for row in rows if row[k + 1] is not None]
        ax.bar(xs, ys, width, label=name, color=colour)
    ax.set_xticks(range(len(rows)), [r[0] for r in rows], rotation=20, ha="right", fontsize=8)
    ax.set(yscale="log", ylabel="attention forward + backward (s)",
           title="packed / padded / windowed rows: segments vs dense mask")
    ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)

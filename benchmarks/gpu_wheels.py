"""Wheels of the tested transformers / lightning stack, for a GPU machine that cannot reach a package index.

``gpu_check.py`` runs against whatever the GPU machine has installed. If its transformers or lightning
are too old for the package (the script's versions line says ``IMPORT FAILED`` and it exits with 2),
carry this project's tested versions along instead: this script downloads, for the GPU machine's Python
version, the wheels of every package that transformers, lightning and torchmetrics need **except torch
and what torch needs** (the machine's CUDA build of torch stays in use), pinned to the versions installed
here. On the GPU machine, a virtual environment that sees the system packages takes them:

    python benchmarks/gpu_wheels.py --python-version 3.12 --dest gpu_wheels     # here, with an index
    python -m venv --system-site-packages /tmp/gv && . /tmp/gv/bin/activate \\
        && pip install -q --no-index --find-links gpu_wheels transformers lightning torchmetrics   # there

pip then resolves against the system's torch and installs from ``gpu_wheels`` only what is missing or
too old. ``--list`` prints the pins without downloading anything.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import subprocess
import sys

from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOTS = ("transformers", "lightning", "torchmetrics")
# on every machine that has torch (numpy), or compiled per Python version and already there
ASSUMED_PRESENT = ("numpy",)


def _key(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def closure(roots: tuple[str, ...], stop: set[str] = frozenset()) -> dict[str, str]:
    """Installed ``{name: version}`` of ``roots`` and everything they require here (extras such as
    ``fsspec[http]`` included), without ``stop``."""
    base = default_environment()
    seen: dict[str, str] = {}
    done: set[tuple[str, str]] = set()
    todo: list[tuple[str, str]] = [(name, "") for name in roots]
    while todo:
        name, extra = todo.pop()
        key = _key(name)
        if (key in stop and not extra) or (key, extra) in done:
            continue
        done.add((key, extra))
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # an optional dependency not installed here: not needed by the tested stack either
        if key not in stop:
            seen[key] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({**base, "extra": extra}):
                # of a package in ``stop`` only what the extra adds (fsspec is torch's, fsspec[http] lightning's)
                if key in stop and (req.marker is None or req.marker.evaluate({**base, "extra": ""})):
                    continue
                todo += [(req.name, "")] + [(req.name, e) for e in req.extras]
    return seen


def pins() -> list[str]:
    """``name==version`` of the tested stack minus torch's own closure and ``ASSUMED_PRESENT``."""
    stop = set(closure(("torch",))) | {_key(n) for n in ASSUMED_PRESENT}
    return [f"{name}=={version}" for name, version in sorted(closure(ROOTS, stop).items())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python-version", default=f"{sys.version_info.major}.{sys.version_info.minor}",
                        help="the GPU machine's Python (major.minor); compiled wheels are chosen for it")
    parser.add_argument("--platform", nargs="+", default=["manylinux_2_28_x86_64", "manylinux2014_x86_64"])
    parser.add_argument("--dest", default="gpu_wheels")
    parser.add_argument("--list", action="store_true", help="print the pins and stop")
    args = parser.parse_args(argv)
    wanted = pins()
    if args.list:
        print("\n".join(wanted))
        return 0
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", args.dest,
           "--python-version", args.python_version, "--implementation", "cp"]
    for plat in args.platform:
        cmd += ["--platform", plat]
    return subprocess.call(cmd + wanted)


if __name__ == "__main__":
    sys.exit(main())

"""Turn a distributed (DCP) checkpoint written by ``UlyssesFSDPStrategy`` into a standard one.

    python -m lightning_ulysses.convert_checkpoint path/to/ckpt_folder path/to/out.ckpt [--overwrite]

The result is a regular Lightning checkpoint file: ``state_dict`` with the LightningModule's
parameter names, optimizer states keyed by parameter index as ``torch.optim`` writes them, and
the loop/callback/hyperparameter entries. It loads with ``LightningModule.load_from_checkpoint``
and resumes a Trainer without SP or FSDP. Everything is gathered in CPU memory.

The folder is checked against its completion marker first (a torn folder is refused, naming the
file); the output is written atomically with its own marker, and an existing one is kept unless
``--overwrite``. ``meta.pt`` loads with ``weights_only=True``, but torch unpickles DCP's
``.metadata`` itself, which can run code: convert only checkpoints you would trust like code.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from lightning.fabric.utilities.load import _METADATA_FILENAME as METADATA_FILE  # written beside the shards

from .lightning.checkpoint_io import check_checkpoint, load_trusted, sidecar_path, write_atomically


def _optimizer_by_index(state: dict[str, Any]) -> dict[str, Any]:
    """Re-key an optimizer state saved by parameter name (DCP) by parameter index (torch.optim)."""
    index: dict[str, int] = {}
    groups = []
    for group in state["param_groups"]:
        ids = []
        for name in group["params"]:
            index.setdefault(name, len(index))
            ids.append(index[name])
        groups.append({**group, "params": ids})
    # an optimizer without per-parameter state (SGD without momentum) saves no "state" entry through DCP
    return {"state": {index[k]: v for k, v in state.get("state", {}).items()}, "param_groups": groups}


def consolidate_checkpoint(folder: str | Path, output_file: str | Path | None = None,
                           overwrite: bool = False) -> dict[str, Any]:
    """Load a sharded checkpoint folder into one standard checkpoint dict (and save it if asked).

    Args:
        folder: the directory ``trainer.save_checkpoint`` wrote under
            ``UlyssesFSDPStrategy(save_distributed_checkpoint=True)``.
        output_file: where to write the result (atomically, with a completion marker); ``None`` only
            returns it.
        overwrite: replace an existing ``output_file``; otherwise :class:`FileExistsError`.

    Guarantees: nothing is read from a folder that fails
    :func:`~lightning_ulysses.lightning.checkpoint_io.check_checkpoint` (torn or incomplete), ``meta.pt``
    and the gathered tensors load with ``weights_only=True``, and ``output_file`` is either untouched or
    the whole result. DCP's ``.metadata`` is unpickled by torch: trust the folder like code.
    """
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    folder = Path(folder)
    if not folder.is_dir() or not (folder / METADATA_FILE).is_file():
        raise FileNotFoundError(f"{folder} is not a distributed checkpoint folder (no {METADATA_FILE}).")
    if output_file is not None and Path(output_file).exists() and not overwrite:
        raise FileExistsError(f"{output_file} exists; pass --overwrite (overwrite=True) to replace it.")
    check_checkpoint(folder)
    checkpoint = load_trusted(folder, map_location="cpu")  # meta.pt, before any shard: refused early if unsafe
    with tempfile.TemporaryDirectory() as tmp:
        flat = Path(tmp) / "flat.pt"
        dcp_to_torch_save(folder, flat)
        shards = load_trusted(flat, map_location="cpu")
    checkpoint["state_dict"] = shards.pop("state_dict")
    optimizers = sorted((k for k in shards if re.fullmatch(r"optimizer_\d+", k)), key=lambda k: int(k.split("_")[1]))
    checkpoint["optimizer_states"] = [_optimizer_by_index(shards.pop(k)) for k in optimizers]
    if output_file is not None:
        step = checkpoint.get("global_step")
        write_atomically(output_file, lambda staged: torch.save(checkpoint, staged),
                         global_step=step if type(step) is int else None)
    return checkpoint


def main(argv: list[str] | None = None) -> None:
    """The command line: convert, then print what was written."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Trust: the folder's meta.pt loads with torch.load(weights_only=True), but DCP's .metadata is "
               "unpickled by torch, which can run code. Convert only checkpoints you would trust like code.",
    )
    parser.add_argument("folder", help="distributed checkpoint folder (checked against its completion marker)")
    parser.add_argument("output_file", help="standard checkpoint file to write (atomically, with a marker)")
    parser.add_argument("--overwrite", action="store_true", help="replace output_file if it exists")
    args = parser.parse_args(argv)
    try:
        checkpoint = consolidate_checkpoint(args.folder, args.output_file, overwrite=args.overwrite)
    except (FileExistsError, FileNotFoundError, RuntimeError) as err:
        parser.exit(1, f"convert_checkpoint: error: {err}\n")
    out = Path(args.output_file)
    print(f"wrote {out} ({out.stat().st_size} bytes) from {args.folder}: {len(checkpoint['state_dict'])} tensors in "
          f"state_dict, {len(checkpoint['optimizer_states'])} optimizer state(s), global step "
          f"{checkpoint.get('global_step')}; completion marker {sidecar_path(out)}")


if __name__ == "__main__":
    main()

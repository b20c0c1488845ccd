"""Turn a distributed (DCP) checkpoint written by ``UlyssesFSDPStrategy`` into a standard one.

    python -m lightning_ulysses.convert_checkpoint path/to/ckpt_folder path/to/out.ckpt

The result is a regular Lightning checkpoint file: ``state_dict`` with the LightningModule's
parameter names, optimizer states keyed by parameter index as ``torch.optim`` writes them, and
the loop/callback/hyperparameter entries. It loads with ``LightningModule.load_from_checkpoint``
and resumes a Trainer without SP or FSDP. Everything is gathered in CPU memory.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from lightning.fabric.utilities.load import _METADATA_FILENAME as METADATA_FILE  # written beside the shards


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


def consolidate_checkpoint(folder: str | Path, output_file: str | Path | None = None) -> dict[str, Any]:
    """Load a sharded checkpoint folder into one standard checkpoint dict (and save it if asked).

    Args:
        folder: the directory ``trainer.save_checkpoint`` wrote under
            ``UlyssesFSDPStrategy(save_distributed_checkpoint=True)``.
        output_file: where to ``torch.save`` the result; ``None`` only returns it.

    The checkpoint's pickled extras are loaded with ``weights_only=False``: only consolidate
    checkpoints you wrote yourself.
    """
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    folder = Path(folder)
    if not (folder / METADATA_FILE).is_file():
        raise FileNotFoundError(f"{folder} is not a distributed checkpoint folder (no {METADATA_FILE}).")
    with tempfile.TemporaryDirectory() as tmp:
        flat = Path(tmp) / "flat.pt"
        dcp_to_torch_save(folder, flat)
        shards = torch.load(flat, map_location="cpu", weights_only=False)
    checkpoint = torch.load(folder / METADATA_FILE, map_location="cpu", weights_only=False)
    checkpoint["state_dict"] = shards.pop("state_dict")
    optimizers = sorted((k for k in shards if re.fullmatch(r"optimizer_\d+", k)), key=lambda k: int(k.split("_")[1]))
    checkpoint["optimizer_states"] = [_optimizer_by_index(shards.pop(k)) for k in optimizers]
    if output_file is not None:
        torch.save(checkpoint, output_file)
    return checkpoint


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="distributed checkpoint folder")
    parser.add_argument("output_file", help="standard checkpoint file to write")
    args = parser.parse_args(argv)
    consolidate_checkpoint(args.folder, args.output_file)


if __name__ == "__main__":
    main()

"""How many tiles and where they start: tile bounds along the sequence, and a tile count agreed by all ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["agree_on_shards", "tile_bounds"]


def tile_bounds(seqlen: int, shards: int) -> list[tuple[int, int]]:
    """``(start, end)`` of each tile of a sequence of ``seqlen`` tokens split into ``shards`` tiles.

    Sizes follow :func:`torch.tensor_split` (the first ``seqlen % n`` tiles are one token longer), with
    ``n = min(shards, seqlen)`` so no tile is ever empty: a sequence shorter than ``shards`` gives
    ``seqlen`` tiles of one token. An empty sequence gives a single empty tile so ``fn`` still runs once
    and the output keeps its shape.
    """
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    n = max(1, min(shards, seqlen))
    base, extra = divmod(seqlen, n)
    bounds, start = [], 0
    for i in range(n):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def agree_on_shards(shards: int, group: dist.ProcessGroup | None = None) -> int:
    """Return the maximum of ``shards`` over the ranks of ``group`` (default: the world group).

    Collective on ``group``: every rank of the group must call it. A no-op returning ``shards`` when
    ``torch.distributed`` is not available or not initialised.

    Tile counts derived from local shapes (e.g. ``seq / hidden``) can differ across ranks when local
    sequence lengths differ. That is harmless for the math, but a ``fn`` that communicates per call
    (ZeRO-3 / FSDP1 parameter gathers inside ``fn``'s submodules) must be called the same number of
    times on every rank or the collectives deadlock, hence the agreement.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return int(shards)
    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend or backend == "mpi":
        device = torch.device("cpu")
    else:
        # NCCL-like backends only reduce accelerator tensors.
        acc = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
        if acc is None:
            device = torch.device("cpu")
        else:
            device = torch.device(acc.type, torch.accelerator.current_device_index())
    value = torch.tensor([int(shards)], dtype=torch.int64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return int(value.item())


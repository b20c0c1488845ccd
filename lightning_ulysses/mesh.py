"""The 2D data-parallel × sequence-parallel device mesh (DESIGN §2).

World ``W = dp × sp``. SP groups are contiguous global ranks ``[k*sp, (k+1)*sp)`` — so that the
all-to-all stays on one node's fast links when ``sp`` divides the processes per node — and DP
groups are strided. Built with torch's ``DeviceMesh`` (dims named ``"dp"`` and ``"sp"``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


def validate_sp(world_size: int, sp: int, procs_per_node: int | None = None) -> int:
    """Check ``sp`` against the world and return ``dp = world // sp``.

    Raises:
        ValueError: ``sp < 1``, ``sp > world`` or ``world % sp != 0``, naming valid choices.
    """
    if not isinstance(sp, int) or sp < 1:
        raise ValueError(f"sp must be a positive integer, got {sp!r}.")
    choices = [d for d in range(1, world_size + 1) if world_size % d == 0]
    if sp > world_size:
        raise ValueError(f"sp={sp} is larger than the world size {world_size}; choose sp from {choices}.")
    if world_size % sp:
        raise ValueError(
            f"world size {world_size} (devices x nodes) is not divisible by sp={sp}; choose sp from {choices} "
            "or change the number of devices."
        )
    if procs_per_node and procs_per_node % sp and sp % procs_per_node:
        warnings.warn(
            f"sp={sp} does not divide the {procs_per_node} processes per node: SP groups will straddle nodes and "
            "the all-to-all will cross the slower inter-node network.",
            stacklevel=2,
        )
    return world_size // sp


@dataclass(frozen=True)
class ParallelDims:
    """Ranks and groups of one process in the DP×SP mesh."""

    mesh: DeviceMesh

    @property
    def sp_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("sp")

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("dp")

    @property
    def sp_size(self) -> int:
        return self.mesh.size(1)

    @property
    def dp_size(self) -> int:
        return self.mesh.size(0)

    @property
    def sp_rank(self) -> int:
        return self.mesh.get_local_rank("sp")

    @property
    def dp_rank(self) -> int:
        return self.mesh.get_local_rank("dp")


def build_mesh(device_type: str, sp: int, procs_per_node: int | None = None) -> ParallelDims:
    """Create the ``("dp", "sp")`` mesh over the initialised default process group.

    Args:
        device_type: ``"cpu"`` or ``"cuda"``.
        sp: sequence-parallel degree; ``dp = world // sp``.
        procs_per_node: used only to warn when SP groups would straddle nodes.
    """
    world = dist.get_world_size()
    dp = validate_sp(world, sp, procs_per_node)
    mesh = init_device_mesh(device_type, (dp, sp), mesh_dim_names=("dp", "sp"))
    return ParallelDims(mesh)

"""The 2D data-parallel × sequence-parallel device mesh (README, "Using it"; docs/topology.md).

World ``W = dp × sp``. SP groups are contiguous global ranks ``[k*sp, (k+1)*sp)`` — so that the
all-to-all stays on one node's fast links when ``sp`` divides the processes per node — and DP
groups are strided. The groups are created here, each with an explicit timeout (by default the
world group's), and wrapped in torch's ``DeviceMesh`` (dims named ``"dp"`` and ``"sp"``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh


def validate_sp(world_size: int, sp: int) -> int:
    """Check ``sp`` against the world and return ``dp = world // sp``.

    Args:
        world_size: processes in the job (nodes × processes per node).
        sp: sequence-parallel degree.

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
    return world_size // sp


def sp_node_span(world_size: int, sp: int, procs_per_node: int) -> tuple[int, float]:
    """``(nodes, off_node)`` for the SP group that spreads widest: the number of nodes it touches, and
    the fraction of each of its all-to-alls' bytes that one of its ranks sends to other nodes.

    Ranks are numbered node by node (``global_rank = node_rank * procs_per_node + local_rank``), as
    Lightning and torchrun number them.
    """
    widest, worst = 1, 0.0
    for start in range(0, world_size, sp):
        nodes = [r // procs_per_node for r in range(start, start + sp)]
        # A rank exchanges an equal share with every peer; the shares for peers on its own node stay there.
        off = max(1 - nodes.count(n) / sp for n in nodes)
        widest, worst = max(widest, len(set(nodes))), max(worst, off)
    return widest, worst


def warn_if_sp_spans_nodes(world_size: int, sp: int, procs_per_node: int) -> None:
    """Warn when an SP group is not inside one node, and say what that costs."""
    nodes, off_node = sp_node_span(world_size, sp, procs_per_node)
    if nodes == 1:
        return
    divisors = [d for d in range(1, procs_per_node + 1) if procs_per_node % d == 0]
    warnings.warn(
        f"sp={sp} with {procs_per_node} processes per node: SP groups span up to {nodes} nodes. Every layer runs "
        "two all-to-alls over the SP group in forward and two in backward (each about 4 x (seq/sp) x hidden "
        f"elements per rank for multi-head attention), and up to {off_node:.0%} of those bytes would now cross the "
        "inter-node network, typically an order of magnitude slower than the links inside a node, on the critical "
        f"path of every layer. Prefer sp in {divisors} (a divisor of the processes per node) and let dp cover the "
        "nodes; see docs/topology.md.",
        stacklevel=2,
    )


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


def world_timeout() -> timedelta | None:
    """The default process group's collective timeout, or ``None`` where torch does not expose it."""
    try:
        group = dist.distributed_c10d._get_default_group()
        device = next(iter(group._device_types), torch.device("cpu"))
        return group._get_backend(device).options._timeout
    except (AttributeError, RuntimeError, StopIteration):  # private API: absent in some torch builds
        return None


def build_mesh(device_type: str, sp: int, procs_per_node: int | None = None,
               timeout: timedelta | None = None) -> ParallelDims:
    """Create the ``("dp", "sp")`` mesh over the initialised default process group.

    Collective over the world: every rank must call it, with the same arguments.

    Args:
        device_type: ``"cpu"`` or ``"cuda"``.
        sp: sequence-parallel degree; ``dp = world // sp``.
        procs_per_node: processes per node; global rank 0 warns when an SP group would span nodes.
        timeout: collective timeout of the SP and DP groups; ``None``: the world group's (torch's
            own subgroups would otherwise get torch's default, 30 minutes or more, so a rank whose SP
            peer stalled would wait that long instead of failing with the job).
    """
    world = dist.get_world_size()
    dp = validate_sp(world, sp)
    if procs_per_node and dist.get_rank() == 0:  # once per job
        warn_if_sp_spans_nodes(world, sp, procs_per_node)
    timeout = timeout if timeout is not None else world_timeout()
    ranks = torch.arange(world).view(dp, sp)
    # Every rank creates every group, in the same order (group creation is collective over the world).
    sp_group, _ = dist.new_subgroups_by_enumeration([row.tolist() for row in ranks], timeout=timeout)
    dp_group, _ = dist.new_subgroups_by_enumeration([col.tolist() for col in ranks.t()], timeout=timeout)
    mesh = DeviceMesh.from_group([dp_group, sp_group], device_type, mesh=ranks, mesh_dim_names=("dp", "sp"))
    return ParallelDims(mesh)


def world_mesh(device_type: str, name: str = "fsdp") -> DeviceMesh:
    """A 1D mesh over the default process group itself (no new group, so the world's timeout holds)."""
    return DeviceMesh.from_group(dist.group.WORLD, device_type, mesh_dim_names=(name,))

"""The data-parallel × sequence-parallel device mesh (README, "Using it"; docs/topology.md).

World ``W = dp × sp``. SP groups are contiguous global ranks ``[k*sp, (k+1)*sp)`` — so that the
all-to-all stays on one node's fast links when ``sp`` divides the processes per node — and DP
groups are strided. The groups are created here, each with an explicit timeout (by default the
world group's), and wrapped in torch's ``DeviceMesh`` (dims named ``"dp"`` and ``"sp"``).

When ``sp`` is more than the model's heads can share, an SP group is split as ``sp = ring × ulysses``
(:meth:`ParallelDims.split`): Ulysses groups are ``ulysses`` contiguous ranks (one node's links), ring
groups are strided by ``ulysses`` inside the SP group, and the mesh ``("dp", "ring", "ulysses")``
describes them. SP rank ``r`` is ring rank ``r // ulysses`` and Ulysses rank ``r % ulysses``.
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


def warn_if_sp_spans_nodes(world_size: int, sp: int, procs_per_node: int, ulysses: int | None = None) -> None:
    """Warn when a Ulysses group (the SP group without a ring) is not inside one node, and say what that
    costs and which splits keep the all-to-alls on a node.

    A ring across nodes is not warned about: its key/value blocks travel point to point, beside the
    block compute, which is what a ring is for (docs/topology.md).
    """
    ulysses = sp if ulysses is None else ulysses
    nodes, off_node = sp_node_span(world_size, ulysses, procs_per_node)
    if nodes == 1:
        return
    divisors = [d for d in range(1, procs_per_node + 1) if procs_per_node % d == 0]
    rings = [f"ring={sp // d}" for d in divisors if sp % d == 0 and d > 1][::-1]
    group = f"Ulysses groups of {ulysses} ranks" if ulysses != sp else "SP groups"
    warnings.warn(
        f"sp={sp} with {procs_per_node} processes per node: {group} span up to {nodes} nodes. Every layer runs "
        "two all-to-alls over the Ulysses group in forward and two in backward (each about 4 x (seq/sp) x hidden "
        f"elements per rank for multi-head attention), and up to {off_node:.0%} of those bytes would now cross the "
        "inter-node network, typically an order of magnitude slower than the links inside a node, on the critical "
        f"path of every layer. Prefer sp in {divisors} (a divisor of the processes per node) and let dp cover the "
        + (f"nodes, or keep sp and let a ring cross the nodes ({', '.join(rings)}: ring attention passes key/value "
           "blocks point to point, overlapped with compute)" if rings else "nodes")
        + "; see docs/topology.md.",
        stacklevel=2,
    )


def valid_splits(sp: int, ulysses_choices: list[int]) -> list[tuple[int, int]]:
    """Every ``(ulysses, ring)`` with ``ulysses × ring = sp`` and ``ulysses`` in ``ulysses_choices``
    (the Ulysses degrees a model's heads allow), largest Ulysses degree first."""
    return [(u, sp // u) for u in sorted(ulysses_choices, reverse=True) if sp % u == 0]


def choose_split(sp: int, ulysses_choices: list[int], ring: int | None = None,
                 procs_per_node: int | None = None, ring_allowed: bool = True) -> tuple[int, int]:
    """``(ulysses, ring)`` for an SP group of ``sp`` ranks.

    Args:
        sp: the SP degree.
        ulysses_choices: the Ulysses degrees the model allows (its head layout; ``[1, ...]``).
        ring: ``None`` picks the largest Ulysses degree that divides ``sp`` and the processes per
            node (so every all-to-all stays on one node) and runs the rest as a ring; an int sets the
            ring degree (``ring = sp``: a pure ring).
        procs_per_node: processes per node (``None``: one node).
        ring_allowed: ``False`` for a model that cannot run a ring (its token mixers carry state in
            sequence order): only ``ring = 1``.

    Raises:
        ValueError: no split serves, or ``ring`` is not one of them; the message lists the valid splits.
    """
    splits = [(u, r) for u, r in valid_splits(sp, ulysses_choices) if ring_allowed or r == 1]
    shown = ", ".join(f"ulysses={u} x ring={r}" for u, r in splits) or "none"
    if ring is not None:
        if not isinstance(ring, int) or isinstance(ring, bool) or ring < 1:
            raise ValueError(f"ring must be a positive integer or None, got {ring!r}.")
        if (sp // ring, ring) in splits and sp % ring == 0:
            return sp // ring, ring
        why = ("" if ring_allowed else " This model runs no ring (its token mixers carry their state in sequence "
               "order), so only ring=1 is possible.")
        raise ValueError(
            f"ring={ring} cannot split sp={sp}: sp = ulysses x ring, and the Ulysses degree must suit the model's "
            f"heads.{why} Valid splits: {shown}; pass ring=None to let the strategy choose."
        )
    if not splits:
        raise ValueError(
            f"no split of sp={sp} suits this model (it runs no ring, and its heads cannot be shared by {sp} "
            f"ranks); Ulysses degrees it allows: {sorted(ulysses_choices)}. Choose sp from those."
        )
    local = [(u, r) for u, r in splits if not procs_per_node or procs_per_node % u == 0]
    return (local or splits)[0]


@dataclass(frozen=True)
class ParallelDims:
    """Ranks and groups of one process in the DP×SP mesh (and its ring × Ulysses split, if any).

    Attributes:
        mesh: the ``("dp", "sp")`` mesh.
        split_mesh: the ``("dp", "ring", "ulysses")`` mesh after :meth:`split` with ``ring > 1``;
            ``None`` when the SP group is pure Ulysses.
    """

    mesh: DeviceMesh
    split_mesh: DeviceMesh | None = None
    _split_groups: tuple[dist.ProcessGroup, dist.ProcessGroup] | None = None

    @property
    def ulysses_size(self) -> int:
        return self.split_mesh.size(2) if self.split_mesh is not None else self.sp_size

    @property
    def ring_size(self) -> int:
        return self.split_mesh.size(1) if self.split_mesh is not None else 1

    @property
    def ulysses_group(self) -> dist.ProcessGroup:
        """The ranks that exchange heads (all-to-all); the SP group when there is no ring."""
        return self._split_groups[1] if self._split_groups is not None else self.sp_group

    @property
    def ring_group(self) -> dist.ProcessGroup | None:
        """The ranks that pass key/value blocks around (``None`` when there is no ring)."""
        return self._split_groups[0] if self._split_groups is not None else None

    def split(self, ulysses: int, timeout: timedelta | None = None) -> "ParallelDims":
        """This mesh with its SP groups split as ``sp = ring × ulysses`` (``ring = sp / ulysses``).

        Collective over the world when ``ring > 1`` (the groups are created); returns ``self``
        unchanged for ``ulysses = sp``.
        """
        sp, dp = self.sp_size, self.dp_size
        if sp % ulysses:
            raise ValueError(f"ulysses={ulysses} does not divide sp={sp}.")
        if ulysses == sp:
            return self
        timeout = timeout if timeout is not None else world_timeout()
        ranks = torch.arange(dp * sp).view(dp, sp // ulysses, ulysses)
        # every rank creates every group, in the same order (group creation is collective)
        ulysses_groups = [row.tolist() for row in ranks.reshape(-1, ulysses)]
        ring_groups = [col.tolist() for col in ranks.transpose(1, 2).reshape(-1, sp // ulysses)]
        ring_group, _ = dist.new_subgroups_by_enumeration(ring_groups, timeout=timeout)
        ulysses_group, _ = dist.new_subgroups_by_enumeration(ulysses_groups, timeout=timeout)
        device_type = self.mesh.device_type
        split_mesh = DeviceMesh.from_group([self.dp_group, ring_group, ulysses_group], device_type, mesh=ranks,
                                           mesh_dim_names=("dp", "ring", "ulysses"))
        return ParallelDims(self.mesh, split_mesh, (ring_group, ulysses_group))

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

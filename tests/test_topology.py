"""The DP×SP mesh: every group it creates has the strategy's timeout (a stalled SP peer fails the
job in time), and a warning, with its cost, when an SP group spans nodes."""

from __future__ import annotations

import datetime
import os
import time
import warnings

import lightning.pytorch as pl
import pytest
import torch

from lightning_ulysses import UlyssesStrategy
from lightning_ulysses.parallel.mesh import build_mesh, sp_node_span
from tests.distributed import run_distributed
from tests.lightning_setup import LM, Samples, loader, trainer_kwargs


def _group_timeouts(rank, world):
    def timeout(group):
        return group._get_backend(torch.device("cpu")).options._timeout

    given = build_mesh("cpu", 2, timeout=datetime.timedelta(seconds=7))
    inherited = build_mesh("cpu", 2)  # no timeout given: the world group's (run_distributed: 90 s)
    return [timeout(g) for g in (given.sp_group, given.dp_group, inherited.sp_group, inherited.dp_group)]


def test_mesh_groups_get_the_given_or_the_world_timeout():
    seven, ninety = datetime.timedelta(seconds=7), datetime.timedelta(seconds=90)
    for timeouts in run_distributed(_group_timeouts, 4, pg_timeout=ninety):
        assert timeouts == [seven, seven, ninety, ninety]


STALL_TIMEOUT_S = 15  # the strategy's timeout: long enough for Lightning's setup barriers on a busy CPU


class _StalledPeer(LM):
    """Rank 3 stalls in its first training step (until rank 2 has given up, at most 120 s); rank 2, its
    SP peer, records how long its first step waited before failing."""

    def __init__(self, flag: str) -> None:
        super().__init__()
        self.flag = flag
        self.entered = 0.0

    def training_step(self, batch, batch_idx):
        if self.global_rank == 3:
            deadline = time.monotonic() + 120
            while not os.path.exists(self.flag) and time.monotonic() < deadline:
                time.sleep(0.2)
        self.entered = time.monotonic()
        return super().training_step(batch, batch_idx)


def _stall(rank, world, flag):
    lm = _StalledPeer(flag)
    strategy = UlyssesStrategy(sp=2, timeout=datetime.timedelta(seconds=STALL_TIMEOUT_S))
    trainer = pl.Trainer(strategy=strategy, max_steps=1, **trainer_kwargs())
    try:
        trainer.fit(lm, train_dataloaders=loader(Samples(8, 16)))
    except Exception as err:  # noqa: BLE001 - every rank reports how (and when) it failed
        waited = time.monotonic() - lm.entered
        if rank == 2:
            open(flag, "w").close()  # release the stalled peer
        return "failed", waited, f"{type(err).__name__}: {err}"
    return "finished", 0.0, ""


def test_stalled_sp_peer_fails_the_job_within_the_timeout(tmp_path):
    results = run_distributed(_stall, 4, str(tmp_path / "released"), init_pg=False, timeout=200)
    status, waited, error = results[2]
    assert status == "failed", "the SP peer of a stalled rank trained on"
    # Torch's default for new groups is 30 minutes; the stall lasts until rank 2 gives up (or 120 s).
    assert waited < 4 * STALL_TIMEOUT_S, f"rank 2 waited {waited:.0f} s in its SP group: {error}"
    assert "timed out" in error.lower() or "timeout" in error.lower(), error


@pytest.mark.parametrize("world,sp,per_node,nodes,off_node", [
    (4, 4, 2, 2, 0.5),    # sp = 4 on 2 nodes x 2 devices: half of every exchange leaves the node
    (4, 2, 2, 1, 0.0),    # sp = devices per node: inside one node
    (16, 4, 8, 1, 0.0),   # sp divides the devices per node
    (12, 4, 6, 2, 0.5),   # sp does not divide 6: the second group is split 2 + 2 over two nodes
    (32, 32, 8, 4, 0.75),
])
def test_sp_node_span(world, sp, per_node, nodes, off_node):
    assert sp_node_span(world, sp, per_node) == (nodes, off_node)


def _nodes(rank, world, sp, ring=1):
    # Two "nodes" of two processes, numbered as a cluster launcher numbers them.
    os.environ.update(NODE_RANK=str(rank // 2), LOCAL_RANK=str(rank % 2), LOCAL_WORLD_SIZE="2")
    trainer = pl.Trainer(strategy=UlyssesStrategy(sp=sp, ring=ring), num_nodes=2, max_steps=1,
                         **trainer_kwargs(devices=2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(LM(), train_dataloaders=loader(Samples(8, 16)))
    split = (trainer.strategy.ulysses_size, trainer.strategy.ring_size)
    return [str(w.message) for w in caught if "span" in str(w.message)], split


def test_sp_group_spanning_nodes_warns_with_its_cost():
    # pure Ulysses (ring=1) over 2 nodes x 2 devices: every all-to-all crosses the network
    spanning = [w for w, _ in run_distributed(_nodes, 4, 4, 1, init_pg=False)]
    assert len(spanning[0]) == 1 and spanning[1:] == [[], [], []]  # once per job, on global rank 0
    message = spanning[0][0]
    assert "span up to 2 nodes" in message and "50%" in message and "inter-node" in message
    assert "sp in [1, 2]" in message and "ring=2" in message
    assert [w for w, _ in run_distributed(_nodes, 4, 2, 1, init_pg=False)] == [[], [], [], []]


def test_chosen_split_keeps_the_all_to_all_on_a_node():
    # sp=4 over 2 nodes x 2 devices, split left to the strategy: Ulysses inside each node, the ring across
    results = run_distributed(_nodes, 4, 4, None, init_pg=False)
    assert all(w == [] and split == (2, 2) for w, split in results)

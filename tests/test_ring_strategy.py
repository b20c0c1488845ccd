"""Ulysses × ring through the strategies: Trainer (DDP and FSDP2) and Fabric at ``sp`` beyond the head count,
equal to plain DDP over the DP replicas, and a resume under another ``ulysses × ring`` split.

The model has 2 query heads and 1 KV head, so pure Ulysses stops at sp=2: every run here needs the ring.
"""

from __future__ import annotations

import os

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_ulysses import TiledLossCallback, UlyssesFabricStrategy, UlyssesFSDPStrategy, UlyssesStrategy
from tests.distributed import assert_close_rel, grad_ratio, run_distributed
from tests.lightning_setup import LM, Samples, loader, reference_fit, trainer_kwargs
from tests.models import tiny_model

HEADS, KV = 2, 1
SEQ = 32


def _lm() -> LM:
    return LM(heads=HEADS, kv_heads=KV)


def _split_info(strategy) -> dict:
    mesh = strategy.split_mesh
    return dict(ring=strategy.ring_size, ulysses=strategy.ulysses_size,
                mesh=None if mesh is None else (tuple(mesh.mesh.shape), mesh.mesh_dim_names))


class _Split(pl.Callback):
    """The split while training runs (teardown removes the patch, not the mesh)."""

    def on_train_start(self, trainer, pl_module):
        self.info = _split_info(trainer.strategy)
        self.info["layouts"] = {h.ring_layout for h in trainer.strategy._handles}


def _fit(rank, world, kind, ring, steps, layout="zigzag"):
    lm, split = _lm(), _Split()
    callbacks = [split]
    if kind == "ddp-tiled":  # the loss in tiles and the MLPs tiled along the sequence, over a ring
        callbacks.append(TiledLossCallback(shards=2, tile_mlp=True, mlp_shards=2))
    if kind == "fsdp":
        strategy = UlyssesFSDPStrategy(sp=2, ring=ring, ring_layout=layout)  # dp=2 x (1 x 2)
    else:
        strategy = UlyssesStrategy(sp=4, ring=ring, ring_layout=layout)  # dp=1 x sp=4
    trainer = pl.Trainer(strategy=strategy, max_steps=steps, callbacks=callbacks, **trainer_kwargs(devices=world))
    trainer.fit(lm, train_dataloaders=loader(Samples(8, SEQ)))
    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone() for k, v in lm.state_dict().items()}
    return lm.step_losses, state, split.info


@pytest.mark.parametrize("kind, ring, dp, split, layout", [
    ("ddp", None, 1, (2, 2), "zigzag"),  # chosen: the largest Ulysses degree the heads allow (2), the rest a ring
    ("ddp", 4, 1, (1, 4), "zigzag"),  # a pure ring, its causal work balanced (the default layout)
    ("ddp", 4, 1, (1, 4), "contiguous"),  # the same, blocks as the data path cuts them
    ("ddp-tiled", 4, 1, (1, 4), "zigzag"),  # with TiledLossCallback (loss tiles, tiled MLPs)
    ("fsdp", 2, 2, (1, 2), "zigzag"),  # dp=2 x pure ring of 2, FSDP2
], ids=["ddp-auto-2x2", "ddp-ring4", "ddp-ring4-contiguous", "ddp-ring4-tiled", "fsdp-dp2-ring2"])
def test_trainer_fit_beyond_the_head_count_matches_ddp(kind, ring, dp, split, layout):
    steps = 3
    results = run_distributed(_fit, 4, kind, ring, steps, layout, init_pg=False)
    ref = _lm()
    ref_losses = reference_fit(ref, Samples(8, SEQ), steps, dp=dp)
    sp = 4 // dp
    for rank, (losses, state, info) in enumerate(results):
        assert (info["ulysses"], info["ring"]) == split and info["layouts"] == {layout}
        assert info["mesh"] == ((dp, split[1], split[0]), ("dp", "ring", "ulysses"))
        # each rank logs its own SP group's loss: the replica-mean of the reference needs dp=1 here
        if dp == 1:
            assert_close_rel(torch.tensor(losses), torch.tensor(ref_losses), name=f"losses (rank {rank})")
        for k, v in ref.state_dict().items():
            assert_close_rel(state[k], v, name=f"{k} (rank {rank})")
    assert results[0][0] == results[sp - 1][0]  # SP peers hold the same loss


def _fabric(rank, world):
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=world, strategy=UlyssesFabricStrategy(sp=4))
    fabric.launch()
    model = fabric.setup_module(tiny_model("llama", HEADS, KV))
    opt = fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=1e-2))
    data = fabric.setup_dataloaders(DataLoader(Samples(4, SEQ), batch_size=2, shuffle=False))
    losses, first_grad = [], None
    for batch in data:
        out = model(**batch)
        fabric.backward(out.loss)
        if first_grad is None:
            first_grad = torch.cat([p.grad.flatten() for p in model.parameters()])
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    info = _split_info(fabric.strategy)
    return losses, first_grad, {k: v.clone() for k, v in model.state_dict().items()}, info


def test_fabric_beyond_the_head_count_matches_one_device():
    results = run_distributed(_fabric, 4, init_pg=False)
    ref = tiny_model("llama", HEADS, KV)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    ds = Samples(4, SEQ)
    ref_losses, ref_grad = [], None
    for lo in (0, 2):  # dp=1: the whole batch of 2 rows per step, in order
        batch = {k: torch.stack([ds[i][k] for i in (lo, lo + 1)]) for k in ("input_ids", "labels")}
        out = ref(**batch)
        out.loss.backward()
        if ref_grad is None:
            ref_grad = torch.cat([p.grad.flatten() for p in ref.parameters()])
        opt.step()
        opt.zero_grad()
        ref_losses.append(out.loss.item())
    for rank, (losses, grad, state, info) in enumerate(results):
        assert (info["ulysses"], info["ring"]) == (2, 2)
        assert_close_rel(torch.tensor(losses), torch.tensor(ref_losses), name="losses")
        assert grad_ratio(grad, ref_grad) == pytest.approx(1.0, abs=1e-5)
        assert_close_rel(grad, ref_grad, name=f"first gradient (rank {rank})")
        for k, v in ref.state_dict().items():
            assert_close_rel(state[k], v, name=k)


def _resume(rank, world, ckpt_dir, first_ring, then_ring):
    ds = Samples(4, SEQ)  # 4 steps an epoch (dp=1): the checkpoint after epoch 1 resumes exactly
    lm = _lm()
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, save_last=True)
    kw = trainer_kwargs(devices=world, enable_checkpointing=True, default_root_dir=ckpt_dir)
    first = pl.Trainer(strategy=UlyssesStrategy(sp=4, ring=first_ring), max_epochs=1, callbacks=[ckpt], **kw)
    first.fit(lm, train_dataloaders=loader(ds))
    lm2, split = _lm(), _Split()
    with torch.no_grad():  # only weights restored from the checkpoint can match the reference
        for param in lm2.parameters():
            param.add_(1.0)
    then = pl.Trainer(strategy=UlyssesStrategy(sp=4, ring=then_ring), max_epochs=2, callbacks=[split],
                      **dict(kw, enable_checkpointing=False))
    then.fit(lm2, train_dataloaders=loader(ds), ckpt_path=os.path.join(ckpt_dir, "last.ckpt"))
    return {k: v.clone() for k, v in lm2.state_dict().items()}, dict(split.info, steps=len(lm2.step_losses))


def test_resume_under_another_split(tmp_path):
    # an epoch as ulysses 2 x ring 2, one more as a pure ring of 4: the weights of two uninterrupted epochs
    results = run_distributed(_resume, 4, str(tmp_path), 2, 4, init_pg=False)
    ref = _lm()
    reference_fit(ref, Samples(4, SEQ), 8, dp=1)
    for state, info in results:
        assert (info["ulysses"], info["ring"]) == (1, 4) and info["steps"] == 4  # resumed after epoch 1
        for k, v in ref.state_dict().items():
            assert_close_rel(state[k], v, name=k)

"""UlyssesFabricStrategy: a Fabric loop over dp=2 x sp=2 equals plain Fabric DDP over dp=2, and its
checkpoints load without SP."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lightning_ulysses import UlyssesFabricStrategy, current_sp_group
from tests.distributed import assert_close_rel, grad_ratio, run_distributed
from tests.lightning_setup import Samples
from tests.models import tiny_model

STEPS = 3


def _fabric_loop(rank, world, strategy, ckpt_dir):
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=world, strategy=strategy)
    fabric.launch()
    model = tiny_model("llama", 4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt = fabric.setup(model, opt)
    loader = fabric.setup_dataloaders(DataLoader(Samples(8, 30), batch_size=1, shuffle=True))
    sp = isinstance(fabric.strategy, UlyssesFabricStrategy)
    info = {}
    batches = iter(loader)
    if sp:
        info.update(sp_rank=fabric.strategy.sp_rank, dp_rank=fabric.strategy.dp_rank,
                    mesh=tuple(fabric.strategy.device_mesh.mesh.shape),
                    group_active=current_sp_group() is fabric.strategy.sp_group)
    # Both runs hold batch 0 back (same data after it). Under SP, a loss from this rank's chunk alone
    # is refused at the first backward.
    batch = next(batches)
    if sp:
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        local = F.cross_entropy(logits.flatten(0, 1), batch["shift_labels"].flatten(), ignore_index=-100)
        with pytest.raises(RuntimeError, match="sp_token_mean"):
            fabric.backward(local)
    losses, first_grad = [], None
    for _ in range(STEPS):
        out = model(**next(batches))
        fabric.backward(out.loss)
        if first_grad is None:
            first_grad = torch.cat([p.grad.flatten() for p in model.parameters()])
        opt.step()
        opt.zero_grad()
        losses.append(fabric.all_reduce(out.loss.detach(), reduce_op="mean").item())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    path = os.path.join(ckpt_dir, "sp.ckpt")
    if sp:
        fabric.save(path, {"model": model, "optimizer": opt, "step": STEPS})
        fabric.strategy.teardown()
        info["restored"] = model.config._attn_implementation == "sdpa" and current_sp_group() is None
    else:  # plain DDP resumes from the checkpoint written under SP
        fresh = tiny_model("llama", 4, 2, seed=5)
        fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
        fresh, fresh_opt = fabric.setup(fresh, fresh_opt)
        rest = fabric.load(path, {"model": fresh, "optimizer": fresh_opt})
        info["loaded"] = {k: v.clone() for k, v in fresh.state_dict().items()}
        info["rest"] = rest
    return losses, first_grad, state, info


def test_fabric_fit_matches_plain_ddp(tmp_path):
    sp_results = run_distributed(_fabric_loop, 4, "ulysses_sp2", str(tmp_path), init_pg=False)
    ddp_results = run_distributed(_fabric_loop, 2, "ddp", str(tmp_path), init_pg=False)
    ref_losses, ref_grad, ref_state, ddp_info = ddp_results[0]
    for rank, (losses, grad, state, info) in enumerate(sp_results):
        assert (info["sp_rank"], info["dp_rank"], info["mesh"]) == (rank % 2, rank // 2, (2, 2))
        assert info["group_active"] and info["restored"]
        assert_close_rel(torch.tensor(losses), torch.tensor(ref_losses), name=f"losses (rank {rank})")
        # AdamW hides a gradient scale error; the first gradient does not.
        assert grad_ratio(grad, ref_grad) == pytest.approx(1.0, abs=1e-5)
        assert_close_rel(grad, ref_grad, name=f"first gradient (rank {rank})")
        for k, v in ref_state.items():
            assert_close_rel(state[k], v, name=k)
    # The SP checkpoint loads into a plain model, with Fabric DDP and without any Lightning.
    for k, v in sp_results[0][2].items():
        assert torch.equal(ddp_info["loaded"][k], v), k
    assert ddp_info["rest"] == {"step": STEPS}
    plain = tiny_model("llama", 4, 2, seed=5)
    plain.load_state_dict(torch.load(tmp_path / "sp.ckpt", weights_only=True)["model"])
    for k, v in sp_results[0][2].items():
        assert torch.equal(plain.state_dict()[k], v), k


def test_fabric_strategy_validates_world():
    from lightning.fabric import Fabric

    with pytest.raises(ValueError, match=r"world size 4 .* not divisible by sp=3"):
        Fabric(accelerator="cpu", devices=4, strategy=UlyssesFabricStrategy(sp=3))

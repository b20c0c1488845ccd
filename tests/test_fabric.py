"""The Fabric strategies: a Fabric loop with AdamW over dp=2 x sp=2 equals plain Fabric DDP over dp=2,
with DDP and with FSDP2, and their checkpoints load without SP."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lightning_ulysses import UlyssesFabricStrategy, UlyssesFSDPFabricStrategy, current_sp_group
from tests.distributed import assert_close_rel, grad_ratio, run_distributed
from tests.lightning_setup import Samples
from tests.models import tiny_model

STEPS = 3


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # FSDP2 holds DTensor shards


def _strategy(name):
    if name == "fsdp":  # one full checkpoint file, loadable by plain torch
        return UlyssesFSDPFabricStrategy(sp=2, save_distributed_checkpoint=False)
    if name == "fsdp-ckpt":  # + every decoder layer checkpointed, its input kept in host memory
        return UlyssesFSDPFabricStrategy(sp=2, save_distributed_checkpoint=False, activation_checkpointing=True,
                                         offload_activations=True)
    return name  # "ulysses_sp2" (from Fabric's registry) or plain "ddp"


def _checkpointed(layer):
    return "forward" in layer.__dict__  # checkpoint_decoder_layers wraps the instance's forward


def _fabric_loop(rank, world, name, ckpt_dir):
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=world, strategy=_strategy(name))
    fabric.launch()
    # Model first, then its optimizer: FSDP2 replaces the parameters when it shards them.
    model = fabric.setup_module(tiny_model("llama", 4, 2))
    opt = fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=1e-2))
    loader = fabric.setup_dataloaders(DataLoader(Samples(8, 30), batch_size=1, shuffle=True))
    sp = name != "ddp"
    info = {}
    if sp:
        info.update(sp_rank=fabric.strategy.sp_rank, dp_rank=fabric.strategy.dp_rank,
                    mesh=tuple(fabric.strategy.device_mesh.mesh.shape),
                    group_active=current_sp_group() is fabric.strategy.sp_group,
                    checkpointed=[_checkpointed(layer) for layer in model.module.model.layers])
    if name == "fsdp-ckpt":  # a second module set up later (a frozen reference) is checkpointed too
        reference = fabric.setup_module(tiny_model("llama", 4, 2).requires_grad_(False))
        info["checkpointed"] += [_checkpointed(layer) for layer in reference.module.model.layers]
    # Every run holds batch 0 back (same data after it). Under SP, a loss from this rank's chunk alone
    # is refused at the first backward.
    batches = iter(loader)
    batch = next(batches)
    if sp:
        logits = model(**{k: v for k, v in batch.items() if not k.endswith("labels")}).logits
        local = F.cross_entropy(logits.flatten(0, 1), batch["shift_labels"].flatten(), ignore_index=-100)
        with pytest.raises(RuntimeError, match="sp_token_mean"):
            fabric.backward(local)
    losses, first_grad = [], None
    for _ in range(STEPS):
        out = model(**next(batches))
        fabric.backward(out.loss)
        if first_grad is None:
            first_grad = torch.cat([_full(p.grad).flatten() for p in model.parameters()])
        opt.step()
        opt.zero_grad()
        losses.append(fabric.all_reduce(out.loss.detach(), reduce_op="mean").item())
    state = {k: _full(v).clone() for k, v in model.state_dict().items()}
    path = os.path.join(ckpt_dir, f"{name}.ckpt")
    if sp:
        fabric.save(path, {"model": model, "optimizer": opt, "step": STEPS})
        fabric.strategy.teardown()
        info["restored"] = model.config._attn_implementation == "sdpa" and current_sp_group() is None
        info["checkpoint_removed"] = not any(_checkpointed(layer) for layer in model.module.model.layers)
    else:  # plain Fabric DDP resumes from the checkpoint written under SP
        fresh = tiny_model("llama", 4, 2, seed=5)
        fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
        fresh, fresh_opt = fabric.setup(fresh, fresh_opt)
        info["rest"] = fabric.load(os.path.join(ckpt_dir, "ulysses_sp2.ckpt"), {"model": fresh, "optimizer": fresh_opt})
        info["loaded"] = {k: v.clone() for k, v in fresh.state_dict().items()}
    return losses, first_grad, state, info


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The Ulysses DDP run (4 ranks), then plain Fabric DDP over dp=2, which loads its checkpoint."""
    ckpt_dir = tmp_path_factory.mktemp("fabric")
    sp_results = run_distributed(_fabric_loop, 4, "ulysses_sp2", str(ckpt_dir), init_pg=False)
    ddp_results = run_distributed(_fabric_loop, 2, "ddp", str(ckpt_dir), init_pg=False)
    return ckpt_dir, sp_results, ddp_results[0]


def _assert_matches_ddp(sp_results, reference, ckpt):
    ref_losses, ref_grad, ref_state, _ = reference
    for rank, (losses, grad, state, info) in enumerate(sp_results):
        assert (info["sp_rank"], info["dp_rank"], info["mesh"]) == (rank % 2, rank // 2, (2, 2))
        assert info["group_active"] and info["restored"] and info["checkpoint_removed"]
        assert_close_rel(torch.tensor(losses), torch.tensor(ref_losses), name=f"losses (rank {rank})")
        # AdamW hides a gradient scale error; the first gradient does not.
        assert grad_ratio(grad, ref_grad) == pytest.approx(1.0, abs=1e-5)
        assert_close_rel(grad, ref_grad, name=f"first gradient (rank {rank})")
        for k, v in ref_state.items():
            assert_close_rel(state[k], v, name=k)
    # The checkpoint written under SP loads into a plain model with plain torch.
    plain = tiny_model("llama", 4, 2, seed=5)
    plain.load_state_dict(torch.load(ckpt, weights_only=True)["model"])
    for k, v in sp_results[0][2].items():
        assert torch.equal(plain.state_dict()[k], v), k


def test_fabric_fit_matches_plain_ddp(runs):
    ckpt_dir, sp_results, reference = runs
    _assert_matches_ddp(sp_results, reference, ckpt_dir / "ulysses_sp2.ckpt")
    info = reference[3]  # ... and into plain Fabric DDP with fabric.load
    for k, v in sp_results[0][2].items():
        assert torch.equal(info["loaded"][k], v), k
    assert info["rest"] == {"step": STEPS}


@pytest.mark.parametrize("name", ["fsdp", "fsdp-ckpt"])
def test_fabric_fsdp_fit_matches_plain_ddp(runs, name):
    ckpt_dir, _, reference = runs
    results = run_distributed(_fabric_loop, 4, name, str(ckpt_dir), init_pg=False)
    _assert_matches_ddp(results, reference, ckpt_dir / f"{name}.ckpt")
    for _, _, _, info in results:
        assert info["checkpointed"] == [name == "fsdp-ckpt"] * len(info["checkpointed"]) and info["checkpointed"]


def test_fabric_strategies_validate_world_and_registry():
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import STRATEGY_REGISTRY

    names = set(STRATEGY_REGISTRY.available_strategies())
    assert {"ulysses", "ulysses_sp2", "ulysses_fsdp", "ulysses_fsdp_sp4"} <= names
    with pytest.raises(ValueError, match=r"world size 4 .* not divisible by sp=3"):
        Fabric(accelerator="cpu", devices=4, strategy=UlyssesFabricStrategy(sp=3))
    with pytest.raises(ValueError, match="sharding must be"):
        UlyssesFSDPFabricStrategy(sp=2, sharding="zero2")
    with pytest.raises(ValueError, match="set activation_checkpointing=True"):
        UlyssesFSDPFabricStrategy(sp=2, offload_activations=True)


def test_fabric_loader_checks_and_drops_fingerprints():
    from torch.utils.data import default_collate

    from lightning_ulysses.lightning.data import FINGERPRINT_KEY, ShardingCollate
    from lightning_ulysses.lightning.strategies.fabric import _CheckedLoader

    seen = []
    loader = DataLoader(Samples(2, 8), batch_size=1, collate_fn=ShardingCollate(default_collate, 0, 2))
    checked = _CheckedLoader(loader, seen.append)
    batches = list(checked)
    assert len(seen) == 2 and all(FINGERPRINT_KEY not in b for b in batches)
    assert checked.dataset is loader.dataset and len(checked) == 2

"""UlyssesFSDPStrategy: FSDP2 over the DP×SP mesh trains exactly like one device."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from lightning_ulysses import UlyssesFSDPStrategy
from lightning_ulysses.convert_checkpoint import consolidate_checkpoint
from tests.distributed import assert_close_rel, run_distributed
from tests.lightning_setup import LM, Samples, loader, reference_fit, trainer_kwargs
from tests.test_strategy import Recorder


def _full_state(module):
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _fit(rank, world, kw, clip):
    lm, rec = LM(), Recorder()
    trainer = pl.Trainer(strategy=UlyssesFSDPStrategy(sp=2, **kw), max_steps=3, callbacks=[rec],
                         gradient_clip_val=clip, **trainer_kwargs())
    trainer.fit(lm, train_dataloaders=loader(Samples(8, 30)))
    layer = lm.model.model.layers[0]
    return rec.logged, _full_state(lm), type(layer).__name__, "forward" in vars(layer), rec.overlap_chunks


CASES = {
    "full": ({}, None),
    "hybrid": ({"sharding": "hybrid"}, None),
    "checkpointing": ({"activation_checkpointing": True}, None),
    "checkpointing+offload": ({"activation_checkpointing": True, "offload_activations": True}, None),
    "checkpointing+overlap": ({"activation_checkpointing": True, "overlap_chunks": 2}, None),
    "grad-clip": ({}, 0.05),
}


def _clipped_reference(clip):
    """reference_fit with the gradient norm clipped before each step, as Lightning does."""
    ref = LM()
    opt_step = torch.optim.SGD.step

    def step(self, *a, **k):
        torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
        return opt_step(self, *a, **k)

    torch.optim.SGD.step = step
    try:
        logged = reference_fit(ref, Samples(8, 30), 3, dp=2)
    finally:
        torch.optim.SGD.step = opt_step
    return ref, logged


@pytest.mark.parametrize("case", list(CASES))
def test_fsdp_fit_matches_reference(case):
    kw, clip = CASES[case]
    results = run_distributed(_fit, 4, kw, clip)
    if clip is None:
        ref = LM()
        ref_logged = reference_fit(ref, Samples(8, 30), 3, dp=2)
    else:
        ref, ref_logged = _clipped_reference(clip)
    logged, state, layer_cls, patched, overlap = results[0]
    assert overlap == {kw.get("overlap_chunks", 1)}
    assert layer_cls.startswith("FSDP"), "decoder layers were not sharded"
    assert not patched, "activation checkpointing left a patched forward after teardown"
    for r in results:
        assert_close_rel(torch.tensor(r[0]), torch.tensor(ref_logged), name="logged train_loss")
    for k, v in ref.state_dict().items():
        assert_close_rel(state[k], v, name=k)


class UserSharded(LM):
    """A user configure_model that applies fully_shard itself: the strategy must respect it."""

    def configure_model(self):
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(self.model, FSDPModule):
            return
        for layer in self.model.model.layers:
            fully_shard(layer, mesh=self.device_mesh["sp"])  # shard within the SP group only
        fully_shard(self.model, mesh=self.device_mesh["sp"])


def _user_sharded(rank, world):
    lm = UserSharded()
    trainer = pl.Trainer(strategy=UlyssesFSDPStrategy(sp=4), max_steps=2, **trainer_kwargs())
    trainer.fit(lm, train_dataloaders=loader(Samples(4, 32)))
    return _full_state(lm), [p.device_mesh.mesh.tolist() for p in lm.model.parameters()][0]


def test_user_configure_model_is_respected():
    state, mesh = run_distributed(_user_sharded, 4)[0]
    assert mesh == [0, 1, 2, 3]
    ref = LM()
    reference_fit(ref, Samples(4, 32), 2, dp=1)
    for k, v in ref.state_dict().items():
        assert_close_rel(state[k], v, name=k)


def _ckpt(rank, world, sp, batch, epochs, path, resume, distributed):
    lm = LM(momentum=0.9)
    strategy = UlyssesFSDPStrategy(sp=sp, save_distributed_checkpoint=distributed)
    trainer = pl.Trainer(strategy=strategy, max_epochs=epochs, **trainer_kwargs())
    trainer.fit(lm, train_dataloaders=loader(Samples(8, 30, all_valid=True), batch),
                ckpt_path=path if resume else None, weights_only=False)
    if not resume:
        trainer.save_checkpoint(path)
    return _full_state(lm), trainer.global_step


@pytest.mark.parametrize("distributed", [True, False], ids=["dcp-folder", "full-file"])
def test_fsdp_checkpoint_convert_and_resume_under_other_sp(tmp_path, distributed):
    path = str(tmp_path / "ckpt")
    snaps: dict = {}
    reference_fit(LM(momentum=0.9), Samples(8, 30, all_valid=True), 8, dp=2, snapshots=snaps)
    state, step = run_distributed(_ckpt, 4, 2, 1, 1, path, False, distributed)[0]
    assert step == 4
    for k, v in snaps[4].items():
        assert_close_rel(state[k], v, name=k)

    standard = str(tmp_path / "standard.ckpt")
    if distributed:
        consolidate_checkpoint(path, standard)
    else:
        standard = path
    plain = LM.load_from_checkpoint(standard, weights_only=False)  # no SP, no FSDP
    for k, v in snaps[4].items():
        assert_close_rel(plain.state_dict()[k], v, name=k)
    # the converted optimizer state resumes a plain single-process Trainer
    opt_state = torch.load(standard, weights_only=False)["optimizer_states"][0]
    opt = plain.configure_optimizers()
    opt.load_state_dict(opt_state)
    assert len(opt.state) == len(list(plain.parameters()))

    # resume under sp=4, dp=1 with the same global batch: identical continuation
    results = run_distributed(_ckpt, 4, 4, 2, 2, path, True, distributed)
    assert [step for _, step in results] == [8] * 4
    for k, v in snaps[8].items():  # the full state is gathered on rank 0
        assert_close_rel(results[0][0][k], v, name=k)


def test_consolidate_command_line(tmp_path):
    path = str(tmp_path / "ckpt")
    run_distributed(_ckpt, 4, 2, 1, 1, path, False, True)
    import subprocess
    import sys

    out = tmp_path / "out.ckpt"
    res = subprocess.run([sys.executable, "-m", "lightning_ulysses.convert_checkpoint", path, str(out)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert set(torch.load(out, weights_only=False)["state_dict"]) == set(LM().state_dict())


def test_fsdp_argument_errors():
    with pytest.raises(ValueError, match="activation_checkpointing=True"):
        UlyssesFSDPStrategy(sp=2, offload_activations=True)
    with pytest.raises(ValueError, match="sharding"):
        UlyssesFSDPStrategy(sp=2, sharding="zero2")
    with pytest.raises(ValueError, match="param_dtype"):
        UlyssesFSDPStrategy(sp=2, param_dtype="fp8")


def _fsdp1(rank, world):
    from torch.distributed.fsdp import FullyShardedDataParallel

    class Old(LM):
        def configure_model(self):
            # FSDP1 cannot even initialise on CPU; an uninitialised instance is enough to be detected.
            legacy = FullyShardedDataParallel.__new__(FullyShardedDataParallel)
            torch.nn.Module.__init__(legacy)
            self.legacy = legacy

    with pytest.raises(TypeError, match="FSDP1"):
        pl.Trainer(strategy=UlyssesFSDPStrategy(sp=2), max_steps=1, **trainer_kwargs()).fit(
            Old(), loader(Samples(4, 16)))

    class Stray(LM):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match="outside the HF model"):
        pl.Trainer(strategy=UlyssesFSDPStrategy(sp=2), max_steps=1, **trainer_kwargs()).fit(
            Stray(), loader(Samples(4, 16)))
    return True


def test_fsdp1_modules_and_stray_parameters_raise():
    run_distributed(_fsdp1, 4)


def _bf16(rank, world):
    lm = LM()
    trainer = pl.Trainer(strategy=UlyssesFSDPStrategy(sp=2, param_dtype="bfloat16", reduce_dtype="float32"),
                         max_steps=2, **trainer_kwargs())
    trainer.fit(lm, train_dataloaders=loader(Samples(4, 32)))
    return lm.step_losses, next(lm.parameters()).dtype


def test_fsdp_mixed_precision_policy_trains():
    for losses, dtype in run_distributed(_bf16, 4):
        assert dtype == torch.float32  # sharded master weights stay fp32; compute in bf16
        assert all(torch.isfinite(torch.tensor(losses)))
        assert losses[0] == pytest.approx(LM().model(**{k: v[None] for k, v in Samples(4, 32)[0].items()}).loss.item(),
                                          rel=0.05)


def _fit_offload(rank, world, clip):
    import torch.distributed.fsdp as fsdp_module

    policies = []
    fully_shard = fsdp_module.fully_shard

    def spy(module, **kwargs):  # what the strategy asks FSDP2 for, whatever FSDP2 keeps privately
        policy = kwargs.get("offload_policy")
        policies.append((type(policy).__name__, getattr(policy, "pin_memory", None)))
        return fully_shard(module, **kwargs)

    fsdp_module.fully_shard = spy
    lm, rec = LM(), Recorder()
    strategy = UlyssesFSDPStrategy(sp=2, offload_params=True)
    trainer = pl.Trainer(strategy=strategy, max_steps=3, callbacks=[rec], gradient_clip_val=clip, **trainer_kwargs())
    trainer.fit(lm, train_dataloaders=loader(Samples(8, 30)))
    # the tensors the optimizer steps (SGD without momentum keeps no state) and their gradients
    stepped = [p for group in trainer.optimizers[0].param_groups for p in group["params"]]
    opt_devices = {p.device.type for p in stepped} | {p.grad.device.type for p in stepped if p.grad is not None}
    return rec.logged, _full_state(lm), policies, opt_devices, {p.device.type for p in lm.parameters()}


def test_fsdp_offload_params_matches_reference():
    """FSDP2 CPU offload (on CPU the host-device copies are no-ops; the CUDA path is benchmarks/gpu_check.py):
    the policy reaches every fully_shard call, the optimizer state stays on the host, and training with
    gradient clipping is exact."""
    clip = 0.05
    results = run_distributed(_fit_offload, 4, clip)
    ref, ref_logged = _clipped_reference(clip)
    for logged, state, policies, opt_devices, param_devices in results:
        assert policies and set(policies) == {("CPUOffloadPolicy", False)}  # no pinned memory without CUDA
        assert len(policies) == len(LM().model.model.layers) + 1  # every decoder layer, then the model
        assert opt_devices == {"cpu"} and param_devices == {"cpu"}
        assert_close_rel(torch.tensor(logged), torch.tensor(ref_logged), name="logged train_loss")
    for k, v in ref.state_dict().items():
        assert_close_rel(results[0][1][k], v, name=k)


def test_offload_params_wiring_for_cuda():
    """What only a GPU run exercises, checked without one: pinned host memory, host-capable collectives
    (the gradient norm of host gradients), and the buffers (not the parameters) moved to the device."""
    from lightning_ulysses.lightning.strategies.fsdp import OFFLOAD_BACKEND, move_buffers, offload_policy

    cuda = torch.device("cuda", 0)
    strategy = UlyssesFSDPStrategy(sp=1, offload_params=True)
    strategy.parallel_devices = [cuda]
    assert strategy._get_process_group_backend() == OFFLOAD_BACKEND == "cpu:gloo,cuda:nccl"
    strategy = UlyssesFSDPStrategy(sp=1, offload_params=True, process_group_backend="nccl")
    strategy.parallel_devices = [cuda]
    assert strategy._get_process_group_backend() == "nccl"  # the user's choice wins
    strategy = UlyssesFSDPStrategy(sp=1)
    strategy.parallel_devices = [cuda]
    assert strategy._get_process_group_backend() == "nccl"
    assert offload_policy(cuda).pin_memory and not offload_policy(torch.device("cpu")).pin_memory

    module = torch.nn.Sequential(torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 3))
    move_buffers(module, torch.device("meta"))
    assert {b.device.type for b in module.buffers()} == {"meta"}
    assert {p.device.type for p in module.parameters()} == {"cpu"}

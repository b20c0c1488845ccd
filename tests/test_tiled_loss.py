"""Tiled LM loss (apply_tiled_loss / TiledLossCallback): exact, logits never materialised."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist

from lightning_ulysses import TiledLossCallback, UlyssesFSDPStrategy, UlyssesStrategy, apply_tiled_loss, apply_ulysses
from lightning_ulysses.parallel.mesh import build_mesh
from tests.distributed import assert_close_rel, grad_ratio, run_distributed
from tests.lightning_setup import LM, Samples, loader, reference_fit, trainer_kwargs
from tests.models import VOCAB, tiny_model, tokens
from tests.test_strategy import Recorder


def _logit_widths(model):
    widths = []
    model.lm_head.register_forward_hook(lambda m, a, out: widths.append(out.shape[1]))
    return widths


@pytest.mark.parametrize("shards", [1, 3, 7, 64, "auto"])
def test_tiled_loss_equals_hf_loss_without_sp(shards):
    ref, model = tiny_model("llama", 4, 2), tiny_model("llama", 4, 2)
    ids = tokens(2, 21)
    labels = ids.clone()
    labels[0, :9] = -100
    ref_out = ref(input_ids=ids, labels=labels)
    ref_out.loss.backward()
    widths = _logit_widths(model)
    handle = apply_tiled_loss(model, shards)
    out = model(ids, labels=labels)  # positional input_ids too
    assert out.logits is None
    assert_close_rel(out.loss, ref_out.loss, name="loss")
    (out.loss * 2.5).backward()  # upstream gradient reaches every parameter
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert abs(grad_ratio(p.grad, q.grad) - 2.5) < 1e-5 * 2.5, n
    tile = -(-21 // (shards if shards != "auto" else 1))
    assert max(widths) <= max(tile, 1), f"logits of width {max(widths)} materialised"
    model.eval()
    with torch.no_grad():  # eval returns logits as usual
        assert model(input_ids=ids, labels=labels).logits.shape == (2, 21, VOCAB)
    handle.remove()
    assert "forward" not in vars(model)


def _sp_tiled(rank, world, sp, order):
    dims = build_mesh("cpu", sp)
    ref, model = tiny_model("llama", 8, 2), tiny_model("llama", 8, 2)
    ids = tokens(2, 32)
    labels = ids.clone()
    labels[1, :20] = -100  # uneven valid tokens between shards
    ref_out = ref(input_ids=ids, labels=labels)
    ref_out.loss.backward()
    widths = _logit_widths(model)
    if order == "tiled-first":
        tiled, sp_handle = apply_tiled_loss(model, 3), apply_ulysses(model, dims.sp_group)
    else:
        sp_handle, tiled = apply_ulysses(model, dims.sp_group), apply_tiled_loss(model, 3)
    chunk = 32 // sp
    lo = dims.sp_rank * chunk
    out = model(input_ids=ids[:, lo:lo + chunk], labels=labels[:, lo:lo + chunk])
    out.loss.backward()
    assert_close_rel(out.loss, ref_out.loss, name="loss")
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        g = p.grad.clone()
        dist.all_reduce(g, group=dims.sp_group)
        assert_close_rel(g / sp, q.grad, name=n)
    assert max(widths) <= -(-chunk // 3)
    # removal in either order restores the model
    (tiled.remove(), sp_handle.remove()) if order == "tiled-first" else (sp_handle.remove(), tiled.remove())
    assert "forward" not in vars(model) and "_loss_function" not in vars(model)
    return True


@pytest.mark.parametrize("sp,order", [(2, "tiled-first"), (4, "ulysses-first")])
def test_tiled_loss_under_ulysses_is_exact(sp, order):
    run_distributed(_sp_tiled, 4, sp, order)


def _fit(rank, world, strategy_name):
    lm, rec = LM(), Recorder()
    strategy = (UlyssesStrategy(sp=2) if strategy_name == "ddp"
                else UlyssesFSDPStrategy(sp=2, activation_checkpointing=True, offload_activations=True))
    callback = TiledLossCallback(shards=2, tile_mlp=True, mlp_shards=3)
    trainer = pl.Trainer(strategy=strategy, max_steps=3, callbacks=[rec, callback], **trainer_kwargs())
    trainer.fit(lm, train_dataloaders=loader(Samples(8, 30)))
    mlp = lm.model.model.layers[0].mlp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(lm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return rec.logged, state, "forward" in vars(mlp) or "forward" in vars(lm.model)


@pytest.mark.parametrize("strategy_name", ["ddp", "fsdp+checkpointing+offload"])
def test_training_with_tiled_loss_and_mlp_matches_untiled(strategy_name):
    results = run_distributed(_fit, 4, strategy_name)
    ref = LM()
    ref_logged = reference_fit(ref, Samples(8, 30), 3, dp=2)
    logged, state, patched = results[0]
    assert not patched, "tiling left a patch after teardown"
    assert_close_rel(torch.tensor(logged), torch.tensor(ref_logged), name="logged train_loss")
    for k, v in ref.state_dict().items():
        assert_close_rel(state[k], v, name=k)


def test_tiled_loss_refuses_models_without_logits_to_keep():
    with pytest.raises(TypeError, match="logits_to_keep"):
        apply_tiled_loss(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="shards"):
        apply_tiled_loss(tiny_model(), shards=0)

"""UlyssesStrategy end to end: a plain LightningModule trains exactly as without SP."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lightning_ulysses import UlyssesStrategy
from lightning_ulysses.lightning.data import FINGERPRINT_KEY, ShardingCollate
from tests.distributed import assert_close_rel, run_distributed
from tests.lightning_setup import LM, Samples, loader, reference_eval, reference_fit, trainer_kwargs


class Recorder(pl.Callback):
    """Per micro-batch value of the sync_dist-logged train_loss, as a user's logger sees it."""

    def __init__(self):
        self.logged = []
        self.overlap_chunks = set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.logged.append(trainer.callback_metrics["train_loss"].item())
        handles = getattr(trainer.strategy, "_handles", [])
        self.overlap_chunks.update(h.overlap_chunks for h in handles)


def _fit(rank, world, sp, steps, accumulate, validate, overlap_chunks=1):
    lm, rec = LM(), Recorder()
    train, val = Samples(8, 30), Samples(4, 30, seed=5)
    trainer = pl.Trainer(strategy=UlyssesStrategy(sp=sp, overlap_chunks=overlap_chunks), max_steps=steps, accumulate_grad_batches=accumulate,
                         callbacks=[rec], limit_val_batches=None if validate else 0, **trainer_kwargs())
    trainer.fit(lm, train_dataloaders=loader(train), val_dataloaders=loader(val) if validate else None)
    strategy = trainer.strategy
    info = dict(sp_rank=strategy.sp_rank, dp_rank=strategy.dp_rank, sp=strategy.sp_size, dp=strategy.dp_size,
                mesh=tuple(strategy.device_mesh.mesh.shape), attn=lm.model.config._attn_implementation,
                has_forward=("forward" in vars(lm.model)), overlap_chunks=rec.overlap_chunks)
    val_loss = trainer.callback_metrics.get("val_loss")
    return rec.logged, lm.step_losses, {k: v.clone() for k, v in lm.state_dict().items()}, info, (
        None if val_loss is None else val_loss.item())


@pytest.mark.parametrize("steps,accumulate,validate,overlap_chunks", [(3, 1, False, 1), (4, 2, True, 1), (4, 1, True, 2)],
                         ids=["plain", "accumulate+validate", "overlap+validate"])
def test_fit_matches_reference(steps, accumulate, validate, overlap_chunks):
    # 8 samples over dp=2: 4 micro-batches an epoch; with accumulation, validation after epoch 2
    # sees the final weights.
    sp = 2
    results = run_distributed(_fit, 4, sp, steps, accumulate, validate, overlap_chunks)
    ref = LM()
    ref_logged = reference_fit(ref, Samples(8, 30), steps, dp=2, accumulate=accumulate)
    for rank, (logged, local, state, info, val_loss) in enumerate(results):
        assert info["sp_rank"] == rank % 2 and info["dp_rank"] == rank // 2 and info["mesh"] == (2, 2)
        assert info["attn"] == "sdpa" and not info["has_forward"], "patch left behind after teardown"
        assert len(logged) == steps * accumulate
        assert info["overlap_chunks"] == {overlap_chunks}, "the strategy did not apply its overlap_chunks"
        assert_close_rel(torch.tensor(logged), torch.tensor(ref_logged), name="logged train_loss")
        for k, v in ref.state_dict().items():
            assert_close_rel(state[k], v, name=k)
        # SP peers hold the same group loss
        assert local == results[rank ^ 1][1]
        if validate:
            assert val_loss == pytest.approx(reference_eval(ref, Samples(4, 30, seed=5)), rel=1e-5)


def _validate_and_predict(rank, world):
    lm = LM()
    trainer = pl.Trainer(strategy=UlyssesStrategy(sp=4), **trainer_kwargs())
    val = trainer.validate(lm, dataloaders=loader(Samples(4, 30, seed=5)), verbose=False)[0]["val_loss"]
    test = trainer.test(lm, dataloaders=loader(Samples(4, 30, seed=6)), verbose=False)[0]["test_loss"]
    preds = trainer.predict(lm, dataloaders=loader(Samples(4, 30, seed=5)))
    return val, test, [p.clone() for p in preds]


def test_validate_test_predict_exact():
    results = run_distributed(_validate_and_predict, 4)
    ref = LM()
    for val, test, preds in results:
        assert val == pytest.approx(reference_eval(ref, Samples(4, 30, seed=5)), rel=1e-5)
        assert test == pytest.approx(reference_eval(ref, Samples(4, 30, seed=6)), rel=1e-5)
    # predict bypasses SP: full-sequence logits, each rank a distinct sample (world replicas)
    with torch.no_grad():
        ds = Samples(4, 30, seed=5)
        for rank, (_, _, preds) in enumerate(results):
            assert len(preds) == 1 and preds[0].shape == (1, 30, 97)
            assert_close_rel(preds[0], ref.model(input_ids=ds[rank]["input_ids"][None]).logits, name="predict")


def test_sharded_batch_for_known_input():
    ids = torch.tensor([[11, 12, 13, 14, 15, 16, 17]])
    batch = {"input_ids": ids, "labels": ids.clone(), "doc": torch.tensor([5])}
    shards = [ShardingCollate(lambda x: x, r, 2)(batch) for r in range(2)]
    assert shards[0]["input_ids"].tolist() == [[11, 12, 13, 14]]
    assert shards[1]["input_ids"].tolist() == [[15, 16, 17, 0]]
    assert "position_ids" not in shards[0]  # derived by the model's handle, as the model would
    assert shards[0]["shift_labels"].tolist() == [[12, 13, 14, 15]]  # 15 crosses the shard edge
    assert shards[1]["shift_labels"].tolist() == [[16, 17, -100, -100]]
    assert shards[0]["labels"].tolist() == [[11, 12, 13, 14]]
    assert shards[1]["labels"].tolist() == [[15, 16, 17, -100]]
    # the SP padding of an unpacked row is masked: a bidirectional encoder would attend to it
    assert shards[0]["attention_mask"].tolist() == [[1, 1, 1, 1]]
    assert shards[1]["attention_mask"].tolist() == [[1, 1, 1, 0]]
    packed = [ShardingCollate(lambda x: x, r, 2)({**batch, "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2, 3]])})
              for r in range(2)]  # packed rows: none, so flash's varlen path stays available
    assert "attention_mask" not in packed[0] and packed[1]["position_ids"].tolist() == [[1, 2, 3, 4]]
    masked = ShardingCollate(lambda x: x, 1, 2)({**batch, "attention_mask": torch.tensor([[0, 1, 1, 1, 1, 1, 1]])})
    assert masked["attention_mask"].tolist() == [[1, 1, 1, 0]]
    left = ShardingCollate(lambda x: x, 0, 2)({**batch, "attention_mask": torch.tensor([[0, 1, 1, 1, 1, 1, 1]])})
    assert left["shift_labels"].tolist() == [[-100, 13, 14, 15]]  # nothing predicted from the pad
    assert shards[0]["doc"].tolist() == [5] and shards[1]["doc"].tolist() == [5]
    assert torch.equal(shards[0][FINGERPRINT_KEY], shards[1][FINGERPRINT_KEY])
    with pytest.raises(TypeError, match="dict batches"):
        ShardingCollate(lambda x: x, 0, 2)((ids, ids))


def _bypass_eval(rank, world):
    lm = LM()
    trainer = pl.Trainer(strategy=UlyssesStrategy(sp=2, eval_mode="bypass"), max_steps=4, **trainer_kwargs())
    trainer.fit(lm, train_dataloaders=loader(Samples(8, 30)), val_dataloaders=loader(Samples(4, 30, seed=5)))
    return trainer.callback_metrics["val_loss"].item(), {k: v.clone() for k, v in lm.state_dict().items()}


def test_eval_mode_bypass_validates_full_sequences_exactly():
    """In bypass mode validation runs the unpatched model: its batches must not be sharded."""
    results = run_distributed(_bypass_eval, 4)
    ref = LM()
    reference_fit(ref, Samples(8, 30), 4, dp=2)
    for val_loss, state in results:
        for k, v in ref.state_dict().items():
            assert_close_rel(state[k], v, name=k)
        assert val_loss == pytest.approx(reference_eval(ref, Samples(4, 30, seed=5)), rel=1e-5)

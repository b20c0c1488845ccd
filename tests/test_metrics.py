"""Per-position loss under SP equals the non-SP values (torchmetrics, reduced over SP and DP)."""

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_ulysses import PositionalLoss, PositionalLossCallback, UlyssesStrategy
from tests.distributed import run_distributed
from tests.lightning_setup import LM, Samples, loader, trainer_kwargs


def _validate(rank, world):
    import warnings

    from lightning.pytorch.trainer.connectors.logger_connector.result import warning_cache

    warning_cache.clear()  # forked from a parent that may have warned already
    cb = PositionalLossCallback(max_len=32, num_buckets=4)
    trainer = pl.Trainer(strategy=UlyssesStrategy(sp=2), callbacks=[cb], **trainer_kwargs())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.validate(LM(), dataloaders=loader(Samples(4, 30, seed=5)), verbose=False)
    metrics = {k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith("val_pos")}
    return metrics, [str(w.message) for w in caught if "sync_dist" in str(w.message)]


def _reference(num_buckets=4, max_len=32):
    lm, ds = LM(), Samples(4, 30, seed=5)
    sums, counts = torch.zeros(num_buckets, dtype=torch.float64), torch.zeros(num_buckets, dtype=torch.float64)
    with torch.no_grad():
        for i in range(len(ds)):
            ids, labels = ds[i]["input_ids"][None], ds[i]["labels"][None]
            logits = lm.model(input_ids=ids).logits
            target = F.pad(labels[:, 1:], (0, 1), value=-100)
            ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none", ignore_index=-100)
            for pos in range(30):
                if target[0, pos] != -100:
                    b = min(pos * num_buckets // max_len, num_buckets - 1)
                    sums[b] += ce[pos].double()
                    counts[b] += 1
    return (sums / counts).tolist()


def test_positional_loss_under_sp_matches_non_sp():
    ref = _reference()
    for logged, sync_warnings in run_distributed(_validate, 4):
        assert sync_warnings == []  # logged as global values: Lightning does not ask for sync_dist
        got = [logged[f"val_pos_loss/{lo}-{hi}"] for lo, hi in [(0, 8), (8, 16), (16, 24), (24, 32)]]
        assert got == pytest.approx(ref, rel=1e-5)
        assert logged["val_pos_ppl/0-8"] == pytest.approx(torch.tensor(ref[0]).exp().item(), rel=1e-5)


def test_metric_validates_arguments_and_edges():
    with pytest.raises(ValueError, match="num_buckets"):
        PositionalLoss(max_len=2, num_buckets=4)
    assert PositionalLoss(max_len=10, num_buckets=3).bucket_edges() == [(0, 3), (3, 6), (6, 10)]

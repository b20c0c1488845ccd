"""predict_mode="sp": long sequences scored sharded, per-token log-probs of the whole sequence equal the
non-SP model's, and prediction writers see every sample once."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from lightning_ulysses import UlyssesFSDPStrategy, UlyssesStrategy, sp_gather_tokens, sp_shift_labels, token_logprobs
from tests.distributed import assert_close_rel, run_distributed
from tests.lightning_setup import LM, Samples, loader, trainer_kwargs

SP, SEQ = 2, 32  # each rank holds SEQ / SP tokens of a sample


class Scorer(LM):
    def __init__(self):
        super().__init__()
        self.local_lengths = set()

    def predict_step(self, batch, batch_idx):
        self.local_lengths.add(batch["input_ids"].shape[1])
        logits = self.model(**{k: v for k, v in batch.items() if not k.endswith("labels")}).logits
        return sp_gather_tokens(token_logprobs(logits, sp_shift_labels(batch)))  # [1, SEQ]: not [1, SEQ, vocab]


class Writer(BasePredictionWriter):
    def __init__(self):
        super().__init__("batch")
        self.written = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        self.written.append((list(batch_indices), prediction.clone()))


def _predict(rank, world, strategy_cls):
    writer = Writer()
    trainer = pl.Trainer(strategy=strategy_cls(sp=SP, predict_mode="sp"), callbacks=[writer], **trainer_kwargs())
    scorer = Scorer()
    preds = trainer.predict(scorer, dataloaders=loader(Samples(4, SEQ, seed=5)))
    assert scorer.local_lengths == {SEQ // SP}, "predict was not sharded"
    return [p.clone() for p in preds], writer.written, "write_on_batch_end" in vars(writer)


def _reference_logprobs(i):
    ds, lm = Samples(4, SEQ, seed=5), LM()
    ids, labels = ds[i]["input_ids"][None], ds[i]["labels"][None]
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(input_ids=ids).logits.float(), -1)
    target = torch.cat([labels[:, 1:], torch.full((1, 1), -100)], dim=1)
    return logp.gather(-1, target.clamp_min(0)[..., None])[..., 0] * (target != -100)


@pytest.mark.parametrize("strategy_cls", [UlyssesStrategy, UlyssesFSDPStrategy], ids=["ddp", "fsdp"])
def test_predict_sp_matches_non_sp_and_writes_each_sample_once(strategy_cls):
    results = run_distributed(_predict, 4, strategy_cls)
    written = {}
    for rank, (preds, rank_written, patched) in enumerate(results):
        assert not patched, "the writer was left patched after predict"
        dp_rank = rank // SP
        samples = list(range(dp_rank, 4, 4 // SP))  # the dp replica's share, each SP peer the same
        assert len(preds) == len(samples)
        for i, pred in zip(samples, preds):
            assert pred.shape == (1, SEQ)
            assert_close_rel(pred, _reference_logprobs(i), name=f"log-probs of sample {i} (rank {rank})")
        assert (rank_written != []) == (rank % SP == 0), "only SP rank 0 writes"
        for indices, pred in rank_written:
            for j, i in enumerate(indices):
                assert i not in written, f"sample {i} written twice"
                written[i] = pred[j]
    assert sorted(written) == [0, 1, 2, 3]
    for i, pred in written.items():
        assert_close_rel(pred, _reference_logprobs(i)[0], name=f"written sample {i}")


def test_predict_mode_is_validated():
    with pytest.raises(ValueError, match="predict_mode must be 'sp' or 'bypass'"):
        UlyssesStrategy(sp=2, predict_mode="gather")

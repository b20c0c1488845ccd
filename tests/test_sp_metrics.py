"""Metrics under SP: a torchmetrics metric fed this rank's logits is exact with ``sp_shift_labels`` /
``batch["shift_labels"]`` and off with a local shift of ``batch["labels"]``; user code that reads
``labels`` from a sharded batch is warned, the strategy and the handle never are."""

from __future__ import annotations

import copy
import pickle
import warnings

import lightning.pytorch as pl
import torch
from torchmetrics.text import Perplexity

from lightning_ulysses import ShardedBatch, SPLabelsWarning, UlyssesStrategy, apply_ulysses, shard_batch, sp_shift_labels
from tests.distributed import run_distributed
from tests.lightning_setup import LM, Samples, loader, trainer_kwargs
from tests.models import tiny_model, tokens

SEQ = 30  # not a multiple of sp: the sharding pads, and the chunk edges fall inside real tokens


def _labels_warnings(fn) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fn()
    return [w for w in seen if issubclass(w.category, SPLabelsWarning)]


def test_reading_labels_from_a_sharded_batch_warns_and_points_at_the_reader():
    ids = tokens(2, 8)
    batch = shard_batch({"input_ids": ids, "labels": ids}, 0, 2)
    assert isinstance(batch, ShardedBatch)
    for read in (lambda: batch["labels"], lambda: batch.get("labels"), lambda: batch.copy().pop("labels")):
        seen = _labels_warnings(read)
        assert len(seen) == 1 and seen[0].filename == __file__, seen  # the user's line, not ours
        assert "shift_labels" in str(seen[0].message) and "sp_shift_labels" in str(seen[0].message)


def test_model_calls_copies_and_the_package_itself_do_not_warn():
    ids = tokens(2, 8)
    batch = shard_batch({"input_ids": ids, "labels": ids}, 1, 2)
    seen = _labels_warnings(lambda: (
        (lambda **kw: kw["labels"])(**batch),  # what model(**batch) does: ** reads the dict storage
        dict(batch), list(batch.items()), batch["input_ids"], batch["shift_labels"], "labels" in batch,
        sp_shift_labels({k: v for k, v in batch.items() if k != "shift_labels"}),
        sp_shift_labels(batch),
    ))
    assert seen == []
    for clone in (copy.copy(batch), batch.copy(), pickle.loads(pickle.dumps(batch))):  # workers pickle batches
        assert type(clone) is ShardedBatch and clone.keys() == batch.keys()
    plain = shard_batch({"input_ids": ids, "labels": ids}, 0, 1)  # no SP: no chunk edge to lose
    assert type(plain) is dict


def _perplexities(rank, world):
    model = tiny_model("llama", heads=4, kv_heads=2)
    ids = tokens(2, SEQ, seed=4)
    labels = ids.clone()
    labels[1, :5] = -100
    full = {"input_ids": ids, "labels": labels}
    reference = Perplexity(ignore_index=-100)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    reference.update(logits[:, :-1], labels[:, 1:])  # without SP the local shift is the right one
    apply_ulysses(model, torch.distributed.group.WORLD)
    batch = shard_batch(full, rank, world)
    with torch.no_grad():
        local = model(**{k: v for k, v in batch.items() if not k.endswith("labels")}).logits
    exact, shifted, documented = Perplexity(ignore_index=-100), Perplexity(ignore_index=-100), Perplexity(ignore_index=-100)
    exact.update(local, sp_shift_labels(batch))
    documented.update(local, batch["shift_labels"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SPLabelsWarning)
        chunk = batch["labels"]
    shifted.update(local[:, :-1], chunk[:, 1:])  # the trap: the target of each chunk's last position is lost
    # compute() sums the NLL and the token counts over every rank (torchmetrics' default group)
    return reference.compute(), exact.compute(), documented.compute(), shifted.compute()


def test_perplexity_is_exact_with_shift_labels_and_off_with_a_local_shift():
    for sp in (2, 4):
        for reference, exact, documented, shifted in run_distributed(_perplexities, sp):
            assert torch.allclose(exact, reference, rtol=1e-5, atol=0), (sp, exact, reference)
            assert torch.allclose(documented, reference, rtol=1e-5, atol=0)
            # the local shift loses sp - 1 targets per row: off by far more than the tolerance
            assert abs(shifted / reference - 1) > 1e-4, (sp, shifted, reference)


class PerplexityLM(LM):
    """The README's pattern: the model's own loss, a perplexity fed sp_shift_labels, and one read of
    ``batch["labels"]`` at a line of user code (the trap the warning is for)."""

    def __init__(self) -> None:
        super().__init__()
        self.val_ppl = Perplexity(ignore_index=-100)

    def training_step(self, batch, batch_idx):
        self.label_chunk = batch["labels"]  # user code: warned, once for this line
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        out = self.model(**batch)
        self.val_ppl.update(out.logits, sp_shift_labels(batch))
        self.log("val_ppl", self.val_ppl)


def _fit(rank, world):
    lm = PerplexityLM()
    trainer = pl.Trainer(strategy=UlyssesStrategy(sp=2), max_steps=3, **trainer_kwargs(devices=2))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")  # Python's own: once per line of code
        trainer.fit(lm, train_dataloaders=loader(Samples(8, SEQ)), val_dataloaders=loader(Samples(2, SEQ)))
    return [(w.filename, w.lineno) for w in seen if issubclass(w.category, SPLabelsWarning)]


def _reference_ppl() -> float:
    lm, ds = LM(), Samples(3, SEQ, seed=6)
    metric = Perplexity(ignore_index=-100)
    with torch.no_grad():
        for i in range(len(ds)):
            ids, labels = ds[i]["input_ids"][None], ds[i]["labels"][None]
            metric.update(lm.model(input_ids=ids).logits[:, :-1], labels[:, 1:])
    return metric.compute().item()


def test_strategy_run_warns_once_at_the_users_line_and_nowhere_else():
    """Sharding, the batch check, Lightning's transfer, the handle and the loss read labels every step:
    the only warning is the one for the user's own read, once in 3 steps and a validation."""
    line = PerplexityLM.training_step.__code__.co_firstlineno + 1
    assert run_distributed(_fit, 2, init_pg=False) == [[(__file__, line)]] * 2


def _validate_only(rank, world):
    lm = PerplexityLM()
    trainer = pl.Trainer(strategy=UlyssesStrategy(sp=2), **trainer_kwargs(devices=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", SPLabelsWarning)  # validation reads no labels of its own
        trainer.validate(lm, dataloaders=loader(Samples(3, SEQ, seed=6)), verbose=False)
    return trainer.callback_metrics["val_ppl"].item()


def test_validation_perplexity_under_the_strategy_equals_the_single_process_value():
    expected = _reference_ppl()
    for ppl in run_distributed(_validate_only, 2, init_pg=False):
        assert abs(ppl / expected - 1) < 1e-5, (ppl, expected)

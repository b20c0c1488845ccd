"""What a new user meets: configuration errors come before the first optimizer step, once, naming the fix.

* ``sp`` that cannot shard the heads: in the launching process (no worker started) when the model exists
  before launch, else from rank 0 alone, listing only ``sp`` that divide the world;
* flash attention without its package, flex attention training on CPU: our error at setup;
* rows of different lengths: the sharding collate names padding and packing;
* a training batch without labels: our error at the first batch, not Lightning's ``self.log(None)``.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, default_collate

from lightning_ulysses import UlyssesFSDPStrategy, UlyssesStrategy
from lightning_ulysses.lightning.data import ShardingCollate
from lightning_ulysses.lightning.strategies import common
from tests.distributed import run_distributed
from tests.lightning_setup import LM, Samples, loader, trainer_kwargs
from tests.models import tiny_model, tokens


@pytest.fixture
def no_workers(monkeypatch):
    """Fail the test if any launcher starts a worker."""
    from lightning.pytorch.strategies.launchers import multiprocessing, subprocess_script

    def started(*args, **kwargs):
        raise AssertionError("a worker was started before the configuration error")

    monkeypatch.setattr(subprocess_script._SubprocessScriptLauncher, "_call_children_scripts", started)
    monkeypatch.setattr(multiprocessing.mp, "start_processes", started)


class FlashLM(LM):
    """A model whose config names flash attention (transformers refuses it at construction without flash-attn,
    not when the name is set afterwards, e.g. by a config loaded from elsewhere)."""

    def __init__(self) -> None:
        super().__init__(heads=4, kv_heads=2)
        self.model.config._attn_implementation = "flash_attention_2"


class FlexLM(LM):
    def __init__(self) -> None:
        super().__init__(config=tiny_model("llama", 4, 2, attn="flex_attention").config)


@pytest.mark.parametrize("strategy", [lambda: UlyssesStrategy(sp=3, ring=1),
                                      lambda: UlyssesStrategy(sp=3, ring=1, start_method="fork"),
                                      lambda: UlyssesFSDPStrategy(sp=3, ring=1)], ids=["script", "fork", "fsdp"])
def test_split_the_heads_cannot_serve_fails_in_the_launching_process(no_workers, strategy):
    # 4 query / 2 KV heads allow Ulysses degrees 1, 2, 4; sp=3 is possible only as a pure ring.
    trainer = pl.Trainer(**trainer_kwargs(devices=6, max_steps=1, strategy=strategy()))
    with pytest.raises(ValueError, match=r"ring=1 cannot split sp=3.*Valid splits: ulysses=1 x ring=3;"):
        trainer.fit(LM(heads=4, kv_heads=2), loader(Samples(4, 12)))


@pytest.mark.parametrize("module, match", [
    (FlashLM, r"flash_attention_2.*needs the flash-attn package.*sdpa"),
    (FlexLM, r"flex_attention.*cannot train on cpu.*backward on CPU.*sdpa"),
])
def test_backend_that_cannot_train_here_fails_before_launch(no_workers, module, match):
    trainer = pl.Trainer(**trainer_kwargs(devices=2, max_steps=1, strategy=UlyssesStrategy(sp=2)))
    with pytest.raises(ValueError, match=match):
        trainer.fit(module(), loader(Samples(4, 12)))


class LateLM(LM):
    """Builds its HF model in configure_model: only the workers know the heads."""

    def __init__(self, heads: int) -> None:
        pl.LightningModule.__init__(self)
        self.heads = heads
        self.model = None

    def configure_model(self) -> None:
        if self.model is None:
            self.model = tiny_model("llama", self.heads, self.heads)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _outcome(fn) -> tuple[str, str]:
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 - the ranks' SystemExit is what is checked
        return type(e).__name__, str(e)
    return "ok", ""


def _fit_outcomes(rank: int, world: int) -> list[tuple[str, str]]:
    def fit(module):
        trainer = pl.Trainer(**trainer_kwargs(devices=world, max_steps=1, strategy=UlyssesStrategy(sp=world, ring=1)))
        return lambda: trainer.fit(module, loader(Samples(4, 12)))

    # heads 6 allow Ulysses degrees 1, 2, 3, 6; sp=4 splits as 2 x 2 or 1 x 4, not as ring=1. The model built in __init__ is
    # checked at launch (here every rank is its own launcher, as under torchrun), the other in setup.
    return [_outcome(fit(LM(heads=6, kv_heads=6))), _outcome(fit(LateLM(heads=6)))]


def test_split_the_heads_cannot_serve_is_reported_by_rank_zero_alone(monkeypatch):
    monkeypatch.setattr(common, "PEER_GRACE_S", 0.0)  # inherited by the forked ranks
    results = run_distributed(_fit_outcomes, 4, init_pg=False)
    for case in range(2):
        kind, message = results[0][case]
        assert kind == "ValueError" and "ring=1 cannot split sp=4" in message
        assert "Valid splits: ulysses=2 x ring=2, ulysses=1 x ring=4;" in message
        for rank in (1, 2, 3):
            kind, message = results[rank][case]
            assert kind == "SystemExit" and "rank 0 reports" in message and "sp=" not in message


def _apply_outcomes(rank: int, world: int) -> list[tuple[str, str]]:
    from lightning_ulysses import apply_ulysses

    flash = tiny_model("llama", 4, 2)
    flash.config._attn_implementation = "flash_attention_2"
    flex = tiny_model("llama", 4, 2, attn="flex_attention")
    handle = apply_ulysses(flex, torch.distributed.group.WORLD)
    ids = tokens(1, 8)[:, rank * 4:(rank + 1) * 4]
    return [_outcome(lambda: apply_ulysses(flash, torch.distributed.group.WORLD)),
            _outcome(lambda: flex(input_ids=ids, labels=ids)), ("ok", str(handle.remove()))]


def test_apply_ulysses_refuses_backends_that_cannot_run():
    for flash, flex, _ in run_distributed(_apply_outcomes, 2):
        assert flash[0] == "ValueError" and "needs the flash-attn package" in flash[1]
        assert flex[0] == "ValueError" and "flex_attention' cannot train on cpu" in flex[1]


def test_rows_of_different_lengths_name_padding_and_packing():
    samples = [{"input_ids": torch.arange(n), "labels": torch.arange(n)} for n in (5, 7)]
    with pytest.raises(RuntimeError, match="stack expects each tensor to be equal size"):
        default_collate(samples)  # what users met, on some ranks only
    loader = DataLoader(samples, batch_size=2, collate_fn=ShardingCollate(default_collate, 0, 2))
    with pytest.raises(ValueError, match=r"input_ids: 5, 7 tokens.*padding collator.*pack_documents.*"
                                         r"DataCollatorWithFlattening"):
        next(iter(loader))
    lists = [{"input_ids": list(range(n))} for n in (3, 4)]
    with pytest.raises(ValueError, match=r"input_ids: 3, 4 tokens"):
        ShardingCollate(default_collate, 0, 2)(lists)


class Unlabelled(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.ids = tokens(4, 12)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i]}


class NoLogLM(LM):
    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss


class OwnLabelsLM(LM):
    def training_step(self, batch, batch_idx):
        return self.model(**batch, labels=batch["input_ids"]).loss


class Steps(pl.Callback):
    steps = 0

    def on_before_optimizer_step(self, trainer, module, optimizer):
        Steps.steps += 1


def _unlabelled_outcomes(rank: int, world: int) -> list[tuple[str, str] | int]:
    out: list = []
    for module in (LM(), NoLogLM(), OwnLabelsLM()):
        trainer = pl.Trainer(**trainer_kwargs(devices=world, max_steps=1, strategy=UlyssesStrategy(sp=world),
                                              callbacks=[Steps()]))
        out += [_outcome(lambda: trainer.fit(module, loader(Unlabelled()))), Steps.steps]
    return out


def test_training_batch_without_labels_is_named_before_the_first_step():
    for logged, steps_a, returned, steps_b, own, steps_c in run_distributed(_unlabelled_outcomes, 2, init_pg=False):
        for kind, message in (logged, returned):
            assert kind == "ValueError" and "no `labels` (nor `shift_labels`)" in message
            assert "lightning_ulysses.losses.objectives" in message
        assert "failed on it" in logged[1] and "returned no loss" in returned[1]
        assert steps_a == steps_b == 0  # no optimizer step before the error
        assert own == ("ok", "") and steps_c == 1  # labels made in training_step are fine

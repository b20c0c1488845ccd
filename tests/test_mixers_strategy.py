"""The strategies run hybrid models unchanged: a UlyssesStrategy fit equals plain DDP."""

from __future__ import annotations

import pytest

from tests.distributed import assert_close_rel, run_distributed
from tests.test_mixers import SEQ, WORLD, _mixers, exact_here, hybrid_model


def _fit_hybrid(rank, world, family, steps):
    import lightning.pytorch as pl

    from lightning_ulysses import UlyssesStrategy
    from tests.lightning_setup import LM, Samples, loader, trainer_kwargs

    class HybridLM(LM):
        def __init__(self) -> None:
            super().__init__()
            self.model = hybrid_model(family)

    lm = HybridLM()
    trainer = pl.Trainer(strategy=UlyssesStrategy(sp=2), max_steps=steps, **trainer_kwargs())
    trainer.fit(lm, train_dataloaders=loader(Samples(8, SEQ)))
    patched = [n for n, m in _mixers(lm.model) if "forward" in vars(m)]
    return lm.step_losses, {k: v.clone() for k, v in lm.state_dict().items()}, patched


@pytest.mark.parametrize("family", ["qwen3_next", "bamba"])
def test_ulysses_strategy_fit_equals_plain_ddp(family):
    """UlyssesStrategy(sp=2) on 4 processes = plain DDP over 2 replicas, on a hybrid model."""
    from tests.lightning_setup import LM, Samples, reference_fit

    if not exact_here(family):  # an older transformers refuses it (checked there)
        return
    steps = 2
    results = run_distributed(_fit_hybrid, WORLD, family, steps)

    class HybridLM(LM):
        def __init__(self) -> None:
            super().__init__()
            self.model = hybrid_model(family)

    ref = HybridLM()
    reference_fit(ref, Samples(8, SEQ), steps, dp=2)
    for losses, state, patched in results:
        assert patched == [], "mixer patch left behind after teardown"
        assert len(losses) == steps
        for k, v in ref.state_dict().items():
            assert_close_rel(state[k], v, name=k)


def _fit_hybrid_fsdp(rank, world, family, steps):
    import lightning.pytorch as pl
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from lightning_ulysses import UlyssesFSDPStrategy
    from tests.lightning_setup import LM, Samples, loader, trainer_kwargs

    class HybridLM(LM):
        def __init__(self) -> None:
            super().__init__()
            self.model = hybrid_model(family)

    lm = HybridLM()
    trainer = pl.Trainer(strategy=UlyssesFSDPStrategy(sp=2, activation_checkpointing=True), max_steps=steps,
                         **trainer_kwargs())
    trainer.fit(lm, train_dataloaders=loader(Samples(8, SEQ)))
    state = get_model_state_dict(lm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state, [n for n, m in _mixers(lm.model) if "forward" in vars(m)]


@pytest.mark.parametrize("family", ["qwen3_next", "bamba"])
def test_ulysses_fsdp_strategy_fit_equals_plain_ddp(family):
    """UlyssesFSDPStrategy(sp=2), activation checkpointing on: the same weights as plain DDP."""
    from tests.lightning_setup import LM, Samples, reference_fit

    if not exact_here(family):
        return
    steps = 2
    results = run_distributed(_fit_hybrid_fsdp, WORLD, family, steps)

    class HybridLM(LM):
        def __init__(self) -> None:
            super().__init__()
            self.model = hybrid_model(family)

    ref = HybridLM()
    reference_fit(ref, Samples(8, SEQ), steps, dp=2)
    assert all(patched == [] for _, patched in results), "mixer patch left behind after teardown"
    state = results[0][0]  # the full state dict is gathered on rank 0
    for k, v in ref.state_dict().items():
        assert_close_rel(state[k], v, name=k)

"""The README says what the code does: registered names, signatures and defaults, model claims that
the support matrix backs, and no deprecated transformers API called on the way (a FutureWarning per
rank is what a user sees of it)."""

from __future__ import annotations

import inspect
import re
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest

from lightning_ulysses import (TiledLossCallback, UlyssesFabricStrategy, UlyssesFSDPFabricStrategy, UlyssesFSDPStrategy,
                               UlyssesStrategy)
from tests.distributed import run_distributed
from tests.lightning_setup import LM, Samples, loader, trainer_kwargs

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def test_every_registered_strategy_name_is_in_the_readme():
    from lightning.fabric.strategies import STRATEGY_REGISTRY as FABRIC
    from lightning.pytorch.strategies import StrategyRegistry

    names = {n for n in [*StrategyRegistry.available_strategies(), *FABRIC.available_strategies()]
             if n.startswith("ulysses")}
    assert {"ulysses_fsdp", "ulysses_fsdp_sp2"} <= names
    readme = _flat(README)
    spelled = set(re.findall(r"`\"?(ulysses[a-z0-9_]*)\"?`", readme))
    for braces in re.findall(r"`(ulysses[a-z_]*)\{([0-9,]+)\}`", readme):  # ulysses_sp{2,4,8}
        spelled |= {f"{braces[0]}{n}" for n in braces[1].split(",")}
    assert names - spelled == set()


def test_readme_signature_of_the_strategy_lists_every_argument_with_its_real_default():
    readme = _flat(README)
    start = readme.index("`UlyssesStrategy(sp=...")
    shown = readme[start:readme.index("` is a `DDPStrategy`", start)]
    for name, param in inspect.signature(UlyssesStrategy.__init__).parameters.items():
        if name == "self":
            continue
        assert f"{name}=" in shown, name
    timeout = inspect.signature(UlyssesStrategy.__init__).parameters["timeout"].default
    assert timeout.total_seconds() == 30 * 60 and "timeout=timedelta(minutes=30)" in shown
    assert "by default 30 minutes" in readme  # the sentence on stalled SP peers states the same default
    for cls in (UlyssesFSDPStrategy, UlyssesFabricStrategy, UlyssesFSDPFabricStrategy):
        assert inspect.signature(cls.__init__).parameters["timeout"].default == timeout, cls.__name__
        assert "debug_skip_attention" in inspect.signature(cls.__init__).parameters


def _matrix_verdicts() -> dict[str, str]:
    rows = re.findall(r"^\| ([a-z0-9_]+) \| (?:causal|masked) \| [A-Za-z0-9_]+ \| ([a-z]+) \|",
                      (ROOT / "docs" / "supported_models.md").read_text(), re.M)
    verdicts: dict[str, str] = {}
    for arch, verdict in rows:
        verdicts.setdefault(arch, verdict)  # the first row of an architecture is its default configuration
    return verdicts


def test_hybrid_models_the_readme_calls_exact_are_exact_in_the_support_matrix():
    claim = _flat(README)
    claim = claim[claim.index("Qwen3-Next and Qwen3.5 (gated delta-net"):]
    claim = claim[:claim.index("are exact under SP")]
    named = {"Qwen3-Next": "qwen3_next", "qwen3_5_text": "qwen3_5_text", "qwen3_5_moe_text": "qwen3_5_moe_text",
             "Bamba": "bamba", "FalconH1": "falcon_h1", "NemotronH": "nemotron_h", "Zamba2": "zamba2",
             "GraniteMoeHybrid": "granitemoehybrid", "Jamba": "jamba"}
    verdicts = _matrix_verdicts()
    for word, arch in named.items():
        assert word in claim, word
        assert verdicts.get(arch) == "exact", (arch, verdicts.get(arch))
    for arch in ("qwen3_5", "qwen3_5_moe"):  # named as untestable, and so they are
        assert f"`{arch}`" in claim and verdicts.get(arch) == "untestable", arch


def _fit_collecting_deprecations(rank, world, kind):
    strategy = UlyssesFSDPStrategy(sp=2, activation_checkpointing=True) if kind == "fsdp" else UlyssesStrategy(sp=2)
    trainer = pl.Trainer(strategy=strategy, max_steps=2, callbacks=[TiledLossCallback(tile_mlp=True)],
                         **trainer_kwargs(devices=2, limit_val_batches=1))
    lm = LM()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer.fit(lm, train_dataloaders=loader(Samples(4, 16)), val_dataloaders=loader(Samples(2, 16)))
        trainer.predict(lm, dataloaders=loader(Samples(2, 16)))
    return [f"{w.filename}:{w.lineno}: {w.message}" for w in seen
            if issubclass(w.category, (FutureWarning, DeprecationWarning))
            and re.search(r"[/\\](transformers|lightning_ulysses)[/\\]", w.filename)]


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_no_deprecated_transformers_api_is_called_in_a_strategy_run(kind):
    """What ``python -W error::FutureWarning`` would catch, limited to transformers' deprecations and our
    own code (Lightning 2.6 itself trips one of torch's, which is not ours to fix)."""
    for found in run_distributed(_fit_collecting_deprecations, 2, kind, init_pg=False):
        assert found == [], found

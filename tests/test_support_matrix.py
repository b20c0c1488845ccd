"""The whole transformers zoo under SP: every architecture exact or refused, never silently wrong.

Classifies every causal / masked LM and image-text-to-text architecture of the installed transformers
(lightning_ulysses/support/; the vision-language ones with image batches), writes
docs/supported_models.md from the result and checks the README's counts against it.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from lightning_ulysses.support import images
from lightning_ulysses.support.configs import build_tiny
from lightning_ulysses.support.matrix import DOC, counts, render, run_matrix, summary_line, variant_items
from lightning_ulysses.support.reasons import claim_holds, reason_class

README = Path(__file__).resolve().parents[1] / "README.md"
# .ci/newest (the newest-versions check): default configurations only, against the newest transformers that
# pyproject.toml allows; docs/supported_models.md and the README counts describe the pinned one.
DEFAULT_CONFIGS_ONLY = os.environ.get("ULYSSES_MATRIX_DEFAULT_CONFIGS_ONLY") == "1"


def _batch_refusal(v) -> bool:
    """A refusal of a batch SP cannot honour, which only the batch can tell: packed rows the model itself
    would attend across, and a vision-language batch on which transformers switches from causal to
    bidirectional attention."""
    return ((v.variant == "packed+padded" and "packed rows" in v.reason)
            or (v.head == images.HEAD and reason_class(v.reason) == "bidirectional switch"))


@pytest.mark.skipif(DEFAULT_CONFIGS_ONLY, reason="newest-versions leg: default configurations only")
@pytest.mark.timeout(3600)  # ~240 architectures, a few seconds each on 2 cores
def test_every_architecture_is_exact_or_refused():
    results = run_matrix()
    results += run_matrix(variant_items(results))  # the configuration axis
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(render(results))  # regenerated from this transformers version
    bad = [v for v in results if v.verdict in ("wrong", "foreign")]
    assert not bad, "silently wrong or foreign-exception cases:\n" + "\n".join(
        f"{v.arch} ({v.head}, {v.cls}): {v.verdict}: {v.reason}" for v in bad)
    # A model is refused before its first forward; only a batch SP cannot honour is refused at that batch.
    late = [v for v in results if v.verdict == "refused" and v.reason.startswith("at forward") and not _batch_refusal(v)]
    assert not late, "refused only at the first forward, not by apply_ulysses:\n" + "\n".join(
        f"{v.arch}: {v.reason}" for v in late)
    untrue = []
    for v in results:
        if v.verdict == "refused" and not v.variant:
            cls = reason_class(v.reason)
            # float32: some of these models' kernels (grouped MoE matmuls) have no float64
            extra = images.image_config_kwargs(v.arch) if v.head == images.HEAD else {}
            if not claim_holds(cls, build_tiny(v.arch, v.cls, dtype=torch.float32, **extra), v.reason):
                untrue.append(f"{v.arch} ({v.cls}): {cls}: {v.reason}")
    assert not untrue, "refusal reasons that are not true of the model:\n" + "\n".join(untrue)
    # the configuration axis really runs: each kind of row is exact on most architectures it applies to
    exact_rows = Counter(v.variant for v in results if v.variant and v.verdict == "exact")
    floors = {"rope:longrope": 60, "rope:dynamic": 60, "rope:yarn": 60, "rope:llama3": 60, "rope:linear": 60,
              "window:24": 20, "token_type_ids": 10, "packed+padded": 60}
    assert all(exact_rows[k] >= n for k, n in floors.items()), exact_rows
    c = counts(results)
    assert c["exact"] >= 100, c  # the dense decoders, MoE, MLA, sinks and encoders must stay exact
    # the flagship vision-language families stay exact with image batches
    vlm = {v.arch: v.verdict for v in results if v.head == images.HEAD}
    flagships = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3", "llava", "mistral3", "internvl", "glm4v")
    assert all(vlm.get(a) == "exact" for a in flagships), {a: vlm.get(a) for a in flagships}
    readme = README.read_text()
    assert summary_line(results) in readme, (
        f"README's support-matrix counts differ from this run: expected the line {summary_line(results)!r}; "
        "regenerate with `python -m lightning_ulysses.support.matrix` and update the README.")
    assert re.search(r"docs/supported_models\.md", readme)


@pytest.mark.skipif(not DEFAULT_CONFIGS_ONLY, reason="the newest-versions check (.ci/newest) only")
@pytest.mark.timeout(1800)
def test_default_configurations_are_exact_or_refused_on_the_installed_transformers():
    """No architecture in its default configuration silently wrong, nor refused only at its first forward."""
    results = run_matrix()
    bad = [f"{v.arch} ({v.head}, {v.cls}): {v.verdict}: {v.reason}" for v in results
           if v.verdict in ("wrong", "foreign") or (v.verdict == "refused" and v.reason.startswith("at forward")
                                                     and not _batch_refusal(v))]
    assert not bad, "\n".join(bad)
    assert counts(results)["exact"] >= 100, counts(results)

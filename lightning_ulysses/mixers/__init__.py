"""SP execution of token mixers that are not softmax attention (linear attention, state-space scans).

:func:`sp_mixer_for` is the registry the model-coverage analysis asks, for every submodule of a
model, before it decides that a module mixing tokens must be refused. It returns ``None`` for
modules it does not handle.
"""

from __future__ import annotations

from typing import Callable, Protocol

from torch import nn

from ..context import ForwardContext


class MixerSP(Protocol):
    """How one non-attention mixer module runs exactly under SP."""

    def check(self, sp: int) -> None:
        """Raise ``ValueError`` naming the valid ``sp`` values when ``sp`` cannot split this module."""

    def valid_sp(self) -> list[int]:
        """Every ``sp`` this module's head/group layout allows."""

    def apply(self, module: nn.Module, get_context: Callable[[], ForwardContext]) -> Callable[[], None]:
        """Patch ``module`` (instance attributes only) to run on the full sequence for this rank's
        heads; returns the function that undoes the patch exactly."""


def sp_mixer_for(module: nn.Module) -> MixerSP | None:
    """The SP implementation for ``module`` if it is a non-attention mixer we support, else ``None``."""
    return None

"""Lightning strategies; importing this registers the ``ulysses*`` names with Lightning."""

from lightning.pytorch.strategies import StrategyRegistry

from .ddp import UlyssesStrategy

UlyssesStrategy.register_strategies(StrategyRegistry)

__all__ = ["UlyssesStrategy"]

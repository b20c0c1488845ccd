"""Lightning strategies; importing this registers the ``ulysses*`` names with Lightning."""

from lightning.pytorch.strategies import StrategyRegistry

from .ddp import UlyssesStrategy
from .fsdp import UlyssesFSDPStrategy

UlyssesStrategy.register_strategies(StrategyRegistry)
UlyssesFSDPStrategy.register_strategies(StrategyRegistry)

__all__ = ["UlyssesFSDPStrategy", "UlyssesStrategy"]

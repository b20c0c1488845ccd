"""Lightning strategies (Trainer and Fabric); importing this registers the ``ulysses*`` names with both."""

from lightning.fabric.strategies import STRATEGY_REGISTRY as FABRIC_STRATEGY_REGISTRY
from lightning.pytorch.strategies import StrategyRegistry

from .ddp import UlyssesStrategy
from .fabric import UlyssesFabricStrategy, UlyssesFSDPFabricStrategy
from .fsdp import UlyssesFSDPStrategy

UlyssesStrategy.register_strategies(StrategyRegistry)
UlyssesFSDPStrategy.register_strategies(StrategyRegistry)
UlyssesFabricStrategy.register_strategies(FABRIC_STRATEGY_REGISTRY)
UlyssesFSDPFabricStrategy.register_strategies(FABRIC_STRATEGY_REGISTRY)

__all__ = ["UlyssesFSDPFabricStrategy", "UlyssesFSDPStrategy", "UlyssesFabricStrategy", "UlyssesStrategy"]

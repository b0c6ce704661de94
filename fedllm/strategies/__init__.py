from fedllm.strategies import fedavg, fedopt  # noqa: F401  registers the built-in strategies
from fedllm.strategies.base import ClientHooks, RoundInfo, State, Strategy

__all__ = ["ClientHooks", "RoundInfo", "State", "Strategy"]

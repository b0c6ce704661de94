from fedllm.strategies import admm, adversarial, fedamd, fedavg, fedopt, fedspeed, momentum, robust, scaffold, staleness  # noqa: F401  registers the built-in strategies
from fedllm.strategies.base import ClientHooks, RoundInfo, State, Strategy

__all__ = ["ClientHooks", "RoundInfo", "State", "Strategy"]

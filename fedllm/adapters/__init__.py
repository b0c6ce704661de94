from fedllm.adapters import ferret, ffa_lora, full, hetero_lora, lora, sfprompt, wara  # noqa: F401  registers the built-in adapters
from fedllm.adapters.base import Adapter

__all__ = ["Adapter"]

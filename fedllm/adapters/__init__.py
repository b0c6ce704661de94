from fedllm.adapters import ffa_lora, lora  # noqa: F401  registers the built-in adapters
from fedllm.adapters.base import Adapter

__all__ = ["Adapter"]

"""Integrations with other training stacks: `FederatedCallback` for Hugging Face Trainer."""
from fedllm.integrations.transformers import FederatedCallback

__all__ = ["FederatedCallback"]

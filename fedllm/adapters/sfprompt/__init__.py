"""SFPrompt (arXiv 2407.17533): the U-shaped split of the model (`split`) and the adapter
with its split local round (`adapter`)."""
from fedllm.adapters.sfprompt.adapter import SFPrompt

__all__ = ["SFPrompt"]

"""LoRA through peft: A and B of every adapted module are trained, sent and averaged
(FedAvg of A and B separately is not the average of the products B·A)."""
from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

from fedllm.adapters.base import Adapter, check_targets, quiet_peft
from fedllm.registry import ADAPTERS, RecipeError


@ADAPTERS.register("lora")
class LoRA(Adapter):
    """peft LoRA (h = W0 x + alpha/r · B A x); A and B trained and sent."""

    def __init__(
        self,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.05,
        target_modules: list[str] | str | None = None,  # None: peft's default for the architecture
        bias: str = "none",
    ):
        if r <= 0:
            raise RecipeError(f"adapter.r must be at least 1 (got {r}): it is the rank of the low-rank update")
        self.r, self.alpha, self.dropout, self.target_modules, self.bias = r, alpha, dropout, target_modules, bias

    def peft_config(self) -> LoraConfig:
        return LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=self.target_modules,
            bias=self.bias, task_type="CAUSAL_LM",
        )

    def attach(self, model, seed):
        check_targets(model, self.target_modules)
        # peft initialises A from the global RNG: fork it so attach is a pure function of seed.
        with torch.random.fork_rng(devices=[]), quiet_peft():
            torch.manual_seed(seed)
            return get_peft_model(model, self.peft_config())

"""Full-parameter tuning: the selected base weights themselves are trained, and the whole
update travels as is (FedAvg of the full model — the baseline Ferret is measured against).
No peft wrapper: the result is a plain model, exported merged."""
from __future__ import annotations

import re

import torch

from fedllm.adapters.base import Adapter
from fedllm.registry import ADAPTERS, RecipeError


def select(model: torch.nn.Module, pattern: str) -> list[str]:
    """Names of the parameters `pattern` selects ("all", or a regex searched in each name)."""
    names = [n for n, _ in model.named_parameters()]
    return names if pattern == "all" else [n for n in names if re.search(pattern, n)]


@ADAPTERS.register("full")
class FullParameters(Adapter):
    """Full-parameter tuning of the base weights picked by `trainable` ("all", or a regex on
    parameter names); the update is sent in full."""

    export_formats = ("merged",)

    def __init__(self, trainable: str = "all"):
        if trainable != "all":
            try:
                re.compile(trainable)
            except re.error as err:
                raise RecipeError(f"adapter.trainable: '{trainable}' is not a regular expression ({err})") from None
        self.pattern = trainable

    def attach(self, model, seed):
        chosen = set(select(model, self.pattern))
        if not chosen:
            raise RecipeError(f"adapter.trainable='{self.pattern}' matches no parameter of the model")
        for name, p in model.named_parameters():
            if name in chosen and not p.is_floating_point():
                raise RecipeError(f"'{name}' is {p.dtype}: full-parameter tuning needs model.quantization=none")
            p.requires_grad_(name in chosen)
        return model

    def export(self, model, path, fmt="merged"):
        if fmt != "merged":
            raise ValueError(
                f"a full-parameter update is not a peft adapter, so there is no '{fmt}' export; "
                "export the whole model with fmt='merged' (fedllm export ... --to merged)"
            )
        model.save_pretrained(path)

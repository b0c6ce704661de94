"""FFA-LoRA — Sun et al., ICLR 2024 (arXiv 2403.12313): A random and frozen, B zero-initialised
and the only trained, sent and averaged tensor, so s·(Σ p_i B_i)·A is exactly the mean of
the clients' updates (paper Eq. 5)."""
from __future__ import annotations

import hashlib

import torch
from peft.tuners.lora import LoraLayer

from fedllm.adapters.lora import LoRA
from fedllm.registry import ADAPTERS
from fedllm.seeds import derive


def module_generator(seed: int, module_name: str) -> torch.Generator:
    # A dedicated generator per (seed, module): independent of any earlier global-RNG use,
    # so every party derives bit-identical A without sending it.
    return torch.Generator(device="cpu").manual_seed(derive(seed, module_name, tag="ffa-lora"))


@ADAPTERS.register("ffa_lora")
class FFALoRA(LoRA):
    """LoRA with A frozen at a shared seeded random init; only B is trained and sent."""

    def __init__(
        self,
        r: int = 8,
        alpha: float = 8.0,  # the paper keeps alpha = r (scale 1) and raises the lr instead
        dropout: float = 0.0,
        target_modules: list[str] | str | None = None,
        bias: str = "none",
    ):
        super().__init__(r, alpha, dropout, target_modules, bias)

    def attach(self, model, seed):
        model = super().attach(model, seed)
        with torch.no_grad():
            for name, module in model.named_modules():
                if isinstance(module, LoraLayer):
                    for lora_a in module.lora_A.values():
                        fan_in = lora_a.weight.shape[1]
                        bound = 1.0 / fan_in**0.5  # the range of peft's kaiming-uniform A init
                        a = torch.rand(lora_a.weight.shape, generator=module_generator(seed, name), dtype=torch.float32)
                        lora_a.weight.copy_((2 * a - 1) * bound)
                    for lora_b in module.lora_B.values():
                        lora_b.weight.zero_()
        self.prepare_local_round(model)
        return model

    def frozen_a(self, model) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in model.named_parameters() if ".lora_A." in n}

    def prepare_local_round(self, model):
        # peft's set_adapter() turns lora_A gradients back on: re-freeze and check every round.
        for p in self.frozen_a(model).values():
            p.requires_grad_(False)
        trainable = self.trainable(model)
        assert trainable and all(".lora_B." in n for n in trainable), "FFA-LoRA must train lora_B only"

    def metadata(self, model):
        h = hashlib.sha256()
        for name, p in sorted(self.frozen_a(model).items()):
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
        return {"ffa_lora_A_sha256": h.hexdigest()}

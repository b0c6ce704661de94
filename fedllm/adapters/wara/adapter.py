"""WaRA — Heidari et al., arXiv 2506.24092: low-rank updates in the wavelet domain.

A single-level DWT along the feature axes, one low-rank pair (A_w, B_w) shared by the
subbands, the inverse DWT back. As a map on x this is (ALGORITHMS.md § WaRA)

    ΔW = s·C·(L_outᵀ B_w A_w L_in + H_outᵀ B_w A_w H_in)·P,   s = alpha / r,

L, H the periodized analysis matrices, P the padding of odd d_in, C the crop of odd d_out.
ΔW has rank ≤ 2r, WaRA trains half of LoRA's parameters at the same r, and
ΔW = s·[C L_outᵀB_w | C H_outᵀB_w]·[A_w L_in P; A_w H_in P] is an exact rank-2r plain LoRA:
what `export(fmt="peft")` writes. Own modules, not peft, so the engine needs no peft type.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Literal

import torch
from peft import LoraConfig
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from fedllm.adapters.base import Adapter, check_targets
from fedllm.adapters.ffa_lora import module_generator
from fedllm.adapters.wara.wavelets import analysis, pad_adjoint, pad_to_even, synthesis, wavelet_filters
from fedllm.registry import ADAPTERS, RecipeError

LAYER_TYPES = (nn.Linear, Conv1D)  # Conv1D: GPT-2's transposed linear


def layer_dims(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.nf
    return layer.in_features, layer.out_features  # not weight.shape: 4-bit weights are packed


class WaRALinear(nn.Module):
    """A frozen linear layer plus WaRA's update, applied in factored form (never ΔW)."""

    def __init__(self, base: nn.Module, r: int, scale: float, filters: torch.Tensor, dropout: float, odd_padding: str):
        super().__init__()
        self.base_layer = base
        self.d_in, self.d_out = layer_dims(base)
        self.scale, self.odd_padding = scale, odd_padding
        device = base.weight.device
        self.register_buffer("filters", filters.to(device), persistent=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # fp32 like peft's adapter weights under a bf16 base; half sizes round up for odd dims
        self.wara_A = nn.Parameter(torch.zeros(r, (self.d_in + 1) // 2, device=device))
        self.wara_B = nn.Parameter(torch.zeros((self.d_out + 1) // 2, r, device=device))

    @property
    def weight(self) -> torch.Tensor:  # code that reads `proj.weight` (dtype, device) still works
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        return out + self.delta(self.dropout(x)).to(out.dtype)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """ΔW x in fp32, even under bf16/fp16 autocast: DWT, the shared pair on both subbands, inverse DWT."""
        filters = self.filters.float()  # a model cast to bf16 after attach casts the buffer too
        with torch.autocast(x.device.type, enabled=False):
            coeffs = analysis(pad_to_even(x.float(), self.odd_padding), filters)  # (..., 2, d_in/2)
            coeffs = coeffs @ self.wara_A.float().t() @ self.wara_B.float().t()  # (..., 2, d_out/2)
            return synthesis(coeffs, filters)[..., : self.d_out] * self.scale

    def _subband_rows(self, m: torch.Tensor) -> torch.Tensor:
        """(k, n/2) -> (2k, n): the rows of m·L stacked on those of m·H (Lᵀ, Hᵀ = the synthesis)."""
        coeffs = m.new_zeros(2, m.shape[0], 2, m.shape[1])
        coeffs[0, :, 0], coeffs[1, :, 1] = m, m
        return synthesis(coeffs, self.filters.float()).reshape(2 * m.shape[0], -1)

    @torch.no_grad()
    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B', A'), d_out × 2r and 2r × d_in, with s·B'A' = ΔW exactly."""
        a = pad_adjoint(self._subband_rows(self.wara_A.float()), self.d_in, self.odd_padding)
        b = self._subband_rows(self.wara_B.float().t())[:, : self.d_out].t()
        return b.contiguous(), a.contiguous()

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """ΔW (d_out × d_in, fp32), for merging and checks only."""
        b, a = self.lora_factors()
        return self.scale * b @ a


def target_names(model: nn.Module, target_modules: list[str] | str | None) -> list[str]:
    """peft's matching rules: a list matches a name or its dotted suffix, a string is a
    full-match regex, `all-linear` is every linear layer but the output head."""
    if target_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
            raise RecipeError(f"adapter.target_modules: no default for model type '{model_type}'; list the layers to adapt")
        target_modules = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None

    def wanted(name: str, module: nn.Module) -> bool:
        if not isinstance(module, LAYER_TYPES):
            return False
        if target_modules == "all-linear":
            return module is not head
        if isinstance(target_modules, str):
            return re.fullmatch(target_modules, name) is not None
        return any(name == t or name.endswith("." + t) for t in target_modules)

    names = [name for name, module in model.named_modules() if wanted(name, module)]
    if not names:
        check_targets(model, target_modules)  # names the linear layers there are
        raise RecipeError(f"adapter.target_modules={target_modules!r} matches no linear layer of the model")
    return names


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


@ADAPTERS.register("wara")
class WaRA(Adapter):
    """WaRA (arXiv 2506.24092): a shared rank-r pair on the wavelet subbands of each update.

    Choices the paper leaves open, fixed here: single-level DWT along each feature axis
    with periodized boundaries (PyWavelets' mode="periodization", an orthogonal map at even
    length; only orthogonal wavelets, checked to reconstruct perfectly); odd dimensions
    padded to even by `odd_padding` (`zero`: append 0, `edge`: repeat the last feature)
    and the reconstruction cropped, which keeps ΔW linear, no longer orthogonal;
    scale s = alpha / r as in LoRA; A_w uniform in ±1/sqrt(d_in/2) from a generator seeded
    by (seed, module) so every party agrees, B_w = 0 so ΔW = 0 at round 0; dropout on the
    layer input as in LoRA; `freeze_a` keeps A_w frozen (FFA-style): only B_w is trained
    and sent, and the aggregate is exactly the mean of the clients' ΔW.
    """

    def __init__(
        self,
        r: int = 8,
        alpha: float = 16.0,
        wavelet: str = "haar",  # any orthogonal PyWavelets wavelet: haar, dbN, symN, coifN
        target_modules: list[str] | str | None = None,  # None: peft's LoRA default for the architecture
        dropout: float = 0.05,
        freeze_a: bool = False,
        odd_padding: Literal["zero", "edge"] = "zero",
    ):
        if r <= 0:
            raise RecipeError(f"adapter.r must be at least 1 (got {r}): it is the rank of the low-rank update")
        self.r, self.alpha, self.wavelet, self.target_modules = r, alpha, wavelet, target_modules
        self.dropout, self.freeze_a, self.odd_padding = dropout, freeze_a, odd_padding
        self.filters = wavelet_filters(wavelet)

    def layers(self, model: nn.Module) -> dict[str, WaRALinear]:
        return {name: m for name, m in model.named_modules() if isinstance(m, WaRALinear)}

    def attach(self, model, seed):
        model.requires_grad_(False)  # as peft does: only the adapter trains
        for name in target_names(model, self.target_modules):
            layer = WaRALinear(model.get_submodule(name), self.r, self.alpha / self.r, self.filters, self.dropout, self.odd_padding)
            with torch.no_grad():
                bound = 1.0 / layer.wara_A.shape[1] ** 0.5  # the range of LoRA's kaiming-uniform A
                a = torch.rand(layer.wara_A.shape, generator=module_generator(seed, f"wara:{name}"), dtype=torch.float32)
                layer.wara_A.copy_((2 * a - 1) * bound)
            replace_module(model, name, layer)
        self.prepare_local_round(model)
        return model

    def prepare_local_round(self, model):
        for layer in self.layers(model).values():
            layer.wara_A.requires_grad_(not self.freeze_a)
            layer.wara_B.requires_grad_(True)
        trainable = self.trainable(model)
        assert trainable and all(n.endswith((".wara_A", ".wara_B")) for n in trainable), "WaRA must train wara_A/wara_B only"

    def metadata(self, model):
        h = hashlib.sha256()
        for name, layer in sorted(self.layers(model).items()):
            h.update(name.encode())
            h.update(layer.wara_A.detach().float().cpu().numpy().tobytes())
        # A_w at attach time is the shared init; with freeze_a it never changes
        return {"wara_A_sha256": h.hexdigest(), "wavelet": self.wavelet, "boundary": "periodization", "odd_padding": self.odd_padding}

    def export(self, model, path, fmt="peft"):
        """`peft`: an exact rank-2r plain LoRA adapter (stock `PeftModel.from_pretrained`).
        `merged`: the base weights with ΔW added (consumes the WaRA layers)."""
        if fmt == "peft":
            self.save_lora(model, Path(path))
        elif fmt == "merged":
            self.merge(model).save_pretrained(path)
        else:
            raise ValueError(f"unknown export format '{fmt}'; this adapter writes: {', '.join(self.export_formats)}")

    def save_lora(self, model: nn.Module, path: Path) -> None:
        layers = self.layers(model)
        tensors = {}
        for name, layer in layers.items():
            b, a = layer.lora_factors()
            # peft's on-disk key names: PeftModel prefix, adapter name dropped
            tensors[f"base_model.model.{name}.lora_A.weight"] = a.cpu()
            tensors[f"base_model.model.{name}.lora_B.weight"] = b.cpu()
        config = LoraConfig(
            r=2 * self.r, lora_alpha=2 * self.alpha,  # 2·alpha / 2r = alpha / r: the same scale s
            target_modules=sorted(layers), lora_dropout=self.dropout, bias="none", task_type="CAUSAL_LM",
            fan_in_fan_out=any(isinstance(m.base_layer, Conv1D) for m in layers.values()),
            base_model_name_or_path=getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        )
        path.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(str(path))
        save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})

    @torch.no_grad()
    def merge(self, model: nn.Module) -> nn.Module:
        for name, layer in self.layers(model).items():
            weight = layer.base_layer.weight
            if not weight.dtype.is_floating_point:
                raise RecipeError("a merged export needs an unquantized base; export --to peft and merge onto the full-precision model")
            delta = layer.delta_weight()
            weight += (delta.t() if isinstance(layer.base_layer, Conv1D) else delta).to(weight.dtype)
            replace_module(model, name, layer.base_layer)
        return model

"""What travels as seeds: a party that knows a seed regenerates the vector it stands for
instead of receiving it. Two wire forms build on it: Ferret's coordinates on seeded bases
(fedllm.adapters.ferret) and a zeroth-order update sent as (seed, scalar) pairs (FedKSeed:
Qin et al., ICML 2024, arXiv 2312.06353, §3), which fedllm.loops.zo produces. Not a codec:
the channel recognises a seeded upload by its meta, whatever the adapter, and rebuilds it
here, so the wire needs no training loop.

A basis v ∈ R^d with entries ~ N(0,1) truncated to [−1/√d, 1/√d] is a pure function of
(seed, block, d, generator device type) (Ferret, Shu et al., arXiv 2409.06277, §3.2). A
direction z(s) over named tensors takes block b to be the b-th tensor by name and divides
its basis by the truncated law's standard deviation, so E[z zᵀ] = I (the truncated normal is
symmetric with independent coordinates) — MeZO's Gaussian z, with a law every party
regenerates identically on any device (generated on the CPU). An update Σ_k c_k z(s_k)
travels as its K pairs (s_k, c_k): 12 bytes a pair, whatever the tensors' size."""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Sequence

import numpy as np
import torch

from fedllm.seeds import derive
from fedllm.wire import MalformedMessage, Message

SEEDS, COEFFS, KIND = "zo/seeds", "zo/coeffs", "zo-seeded"
MAX_PAIRS = 2**20  # pairs one upload may carry (a server-side limit on untrusted input)

Shapes = dict[str, tuple[int, ...]]


# ---- seeded bases ------------------------------------------------------------------------
def truncation(d: int) -> float:
    return d**-0.5


def truncated_normal_variance(a: float) -> float:
    """Variance of N(0,1) truncated to [−a, a]: 1 − 2aφ(a)/(2Φ(a)−1)."""
    if a < 0.05:
        # the closed form cancels catastrophically for small a; this series is exact to ~1e-8
        return a * a / 3 * (1 - 2 * a * a / 15)
    phi = math.exp(-a * a / 2) / math.sqrt(2 * math.pi)
    return 1 - 2 * a * phi / math.erf(a / math.sqrt(2))


def generate(seeds: Sequence[int], block: int, d: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The bases of `seeds` for a block of `d` entries, one row each, in fp32."""
    a = truncation(d)
    edge = math.erf(a / math.sqrt(2))
    out = torch.empty(len(seeds), d, dtype=torch.float32, device=device)
    for row, seed in zip(out, seeds):
        # one dedicated generator per (seed, block), never the global RNG: whatever ran before,
        # on whichever rank, the same (seed, block) gives the same basis
        generator = torch.Generator(device=device).manual_seed(derive(seed, block, tag="ferret"))
        row.uniform_(-edge, edge, generator=generator)
    # inverse-CDF sampling, u ~ U(2Φ(−a)−1, 2Φ(a)−1) ↦ √2·erf⁻¹(u), written out rather than
    # torch.nn.init.trunc_normal_ (the official code's call): that one changed algorithm across
    # torch versions (rejection sampling in 2.13), which would silently change every basis
    return out.erfinv_().mul_(math.sqrt(2)).clamp_(-a, a)


def direction(seed: int, shapes: Shapes) -> dict[str, torch.Tensor]:
    """z of `seed` over the tensors of `shapes` (fp32, CPU): unit-variance coordinates."""
    out = {}
    for block, name in enumerate(sorted(shapes)):
        d = int(np.prod(shapes[name], dtype=np.int64))
        scale = float(np.float32(truncated_normal_variance(truncation(d)) ** -0.5))
        out[name] = generate([seed], block, d)[0].mul_(scale).view(shapes[name])
    return out


def add_scaled(total: dict[str, torch.Tensor], z: dict[str, torch.Tensor], coeff: float) -> None:
    """total += coeff·z, in place — the one arithmetic of both client and server."""
    for name, t in z.items():
        total[name].add_(t, alpha=coeff)


def reconstruct(seeds: list[int], coeffs: list[float], shapes: Shapes) -> dict[str, torch.Tensor]:
    total = {k: torch.zeros(s, dtype=torch.float32) for k, s in shapes.items()}
    for seed, coeff in zip(seeds, coeffs):
        add_scaled(total, direction(seed, shapes), coeff)
    return total


# ---- the (seed, scalar) message ----------------------------------------------------------
class SeededDelta(Mapping):
    """An update Σ_k c_k z(s_k) by name, and its wire form — the pairs."""

    def __init__(self, total: dict[str, torch.Tensor], seeds: list[int], coeffs: list[float]):
        self.total, self.seeds, self.coeffs = total, seeds, coeffs

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.total[name]

    def __iter__(self):
        return iter(self.total)

    def __len__(self) -> int:
        return len(self.total)

    def message(self) -> Message:
        return Message({SEEDS: torch.tensor(self.seeds, dtype=torch.int64),
                        COEFFS: torch.tensor(self.coeffs, dtype=torch.float32)}, {"update": KIND})


def is_seeded(message: Message) -> bool:
    return message.meta.get("update") == KIND


def decode_seeded(tensors: dict[str, torch.Tensor], shapes: Shapes | None) -> dict[str, torch.Tensor]:
    """The server's half: Δ rebuilt from the pairs, shaped by what it expects (never the message)."""
    if shapes is None:
        raise MalformedMessage("a (seed, scalar) upload reached a channel that was not given the update's shapes")
    seeds, coeffs = tensors.get(SEEDS), tensors.get(COEFFS)
    if seeds is None or coeffs is None or seeds.dtype != torch.int64 or not coeffs.is_floating_point():
        raise MalformedMessage("zo: a seeded upload needs int64 zo/seeds and float zo/coeffs")
    if seeds.dim() != 1 or seeds.shape != coeffs.shape or len(seeds) > MAX_PAIRS:
        raise MalformedMessage(f"zo: {tuple(seeds.shape)} seeds and {tuple(coeffs.shape)} scalars do not pair up "
                               f"(at most {MAX_PAIRS})")
    return reconstruct(seeds.tolist(), coeffs.float().tolist(), shapes)

"""Staleness functions s(τ) for asynchronous aggregation: τ = server versions since the
update's starting version. FedAsync (Xie, Koyejo & Gupta 2019, §5.2 "Strategies for α_t")
mixes x_t = (1 − α_t)·x_{t−1} + α_t·x_new with α_t = α·s(t − τ); FedBuff (Nguyen et al.
2022, Algorithm 1 and §5) adds s(τ)·Δ to its buffer (s = (1 + τ)^−½ there)."""
from __future__ import annotations

from fedllm.registry import STALENESS, RecipeError


@STALENESS.register("constant")
class Constant:
    """s(τ) = 1 (FedAsync's constant function)."""

    def weight(self, staleness: int) -> float:
        return 1.0


@STALENESS.register("polynomial")
class Polynomial:
    """s_a(τ) = (τ + 1)^−a (FedAsync's polynomial; a = 0.5 is FedBuff's 1/√(1 + τ))."""

    def __init__(self, a: float = 0.5):
        if a < 0:
            raise RecipeError(f"federation.staleness.a must be >= 0 (got {a})")
        self.a = a

    def weight(self, staleness: int) -> float:
        return float((staleness + 1) ** -self.a)


@STALENESS.register("hinge")
class Hinge:
    """s_{a,b}(τ) = 1 for τ <= b, else 1 / (a(τ − b) + 1) (FedAsync's hinge)."""

    def __init__(self, a: float = 10.0, b: int = 4):
        if a < 0 or b < 0:
            raise RecipeError(f"federation.staleness needs a >= 0 and b >= 0 (got a={a}, b={b})")
        self.a, self.b = a, b

    def weight(self, staleness: int) -> float:
        return 1.0 if staleness <= self.b else 1.0 / (self.a * (staleness - self.b) + 1.0)

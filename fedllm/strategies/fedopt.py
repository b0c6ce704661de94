"""FedAdagrad, FedAdam, FedYogi — Reddi et al., "Adaptive Federated Optimization" (ICLR 2021),
Algorithm 2. The pseudo-gradient is Δ = Σ p_i Δ_i (a descent direction, hence `x += ...`)."""
from __future__ import annotations

import torch

from fedllm.registry import STRATEGIES
from fedllm.strategies.base import RoundInfo, State, Strategy


class FedOpt(Strategy):
    # Reddi et al. Alg. 2: m_{-1} = 0, v_{-1} = τ² (we start v at exactly τ²).
    def __init__(self, server_lr: float, beta1: float, beta2: float, tau: float):
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1 and tau > 0 and server_lr > 0):
            raise ValueError("need 0 ≤ beta1, beta2 < 1, tau > 0 and server_lr > 0")
        self.server_lr, self.beta1, self.beta2, self.tau = server_lr, beta1, beta2, tau

    def init(self, global_state: State) -> State:
        state = {}
        for k, t in global_state.items():
            state[f"m.{k}"] = torch.zeros_like(t, dtype=torch.float32)
            state[f"v.{k}"] = torch.full_like(t, self.tau**2, dtype=torch.float32)
        return state

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def aggregate(self, global_state: State, mean_update: State, server_state: State, info: RoundInfo):
        new_global, new_state = {}, {}
        for k, x in global_state.items():
            delta = mean_update.delta[k].float()
            m = self.beta1 * server_state[f"m.{k}"] + (1 - self.beta1) * delta
            v = self.second_moment(server_state[f"v.{k}"], delta * delta)
            new_global[k] = (x.float() + self.server_lr * m / (v.sqrt() + self.tau)).to(x.dtype)
            new_state[f"m.{k}"], new_state[f"v.{k}"] = m, v
        return new_global, new_state


@STRATEGIES.register("fedadagrad")
class FedAdagrad(FedOpt):
    """FedAdagrad: Adagrad on the server over the mean update Δ: v += Δ²; x += η m/(√v + τ)."""

    def __init__(self, server_lr: float = 0.01, beta1: float = 0.9, tau: float = 1e-3):
        super().__init__(server_lr, beta1, 0.0, tau)

    def second_moment(self, v, delta_sq):
        return v + delta_sq


@STRATEGIES.register("fedadam")
class FedAdam(FedOpt):
    """FedAdam: Adam on the server over the mean update Δ: v = β2 v + (1−β2) Δ²; x += η m/(√v + τ)."""

    def __init__(self, server_lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3):
        super().__init__(server_lr, beta1, beta2, tau)

    def second_moment(self, v, delta_sq):
        return self.beta2 * v + (1 - self.beta2) * delta_sq


@STRATEGIES.register("fedyogi")
class FedYogi(FedOpt):
    """FedYogi: Yogi on the server over the mean update Δ: v = v − (1−β2) Δ² sign(v − Δ²); x += η m/(√v + τ)."""

    def __init__(self, server_lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3):
        super().__init__(server_lr, beta1, beta2, tau)

    def second_moment(self, v, delta_sq):
        return v - (1 - self.beta2) * delta_sq * torch.sign(v - delta_sq)

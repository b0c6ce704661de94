"""FedAvg (McMahan et al. 2017), FedProx (Li et al. 2020) and FedAvgM (Hsu et al. 2019)."""
from __future__ import annotations

import torch

from fedllm.registry import STRATEGIES
from fedllm.strategies.base import MEAN, PLAIN_MEAN, ClientHooks, RoundInfo, State, Strategy, add_scaled


@STRATEGIES.register("fedavg")
class FedAvg(Strategy):
    """Sample-weighted average of client updates: x += η_g Σ p_i Δ_i."""

    def __init__(self, server_lr: float = 1.0):
        self.server_lr = server_lr

    @property
    def needs(self) -> str:
        return PLAIN_MEAN if self.server_lr == 1.0 else MEAN

    def aggregate(self, global_state: State, mean_update: State, server_state: State, info: RoundInfo):
        return add_scaled(global_state, mean_update.delta, self.server_lr), server_state


class ProximalTerm(ClientHooks):
    """Gradient of (μ/2)‖w − x^t‖², added to the local gradient (FedProx Eq. 2)."""

    def __init__(self, mu: float):
        self.mu = mu

    def begin(self, params, ctx):
        self.anchor = {k: ctx.global_state[k].to(p.device, p.dtype) for k, p in params.items()}

    @torch.no_grad()
    def before_step(self, params, regrad):
        for k, p in params.items():
            if p.grad is not None:
                p.grad.add_(p.detach() - self.anchor[k], alpha=self.mu)


@STRATEGIES.register("fedprox")
class FedProx(FedAvg):
    """FedAvg aggregation; clients add a proximal term μ(w − x^t) to every gradient."""

    def __init__(self, mu: float = 0.01, server_lr: float = 1.0):
        super().__init__(server_lr)
        self.mu = mu

    def client_hooks(self, round: int, client_id: int):
        return ProximalTerm(self.mu)


@STRATEGIES.register("fedavgm")
class FedAvgM(Strategy):
    """Server momentum: d = −Σ p_i Δ_i; v = βv + d; x −= η_g v."""

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9):
        self.server_lr, self.momentum = server_lr, momentum

    def init(self, global_state: State) -> State:
        return {f"v.{k}": torch.zeros_like(t, dtype=torch.float32) for k, t in global_state.items()}

    def aggregate(self, global_state: State, mean_update: State, server_state: State, info: RoundInfo):
        v = {k: self.momentum * server_state[f"v.{k}"] - mean_update.delta[k].float() for k in global_state}
        return add_scaled(global_state, v, -self.server_lr), {f"v.{k}": t for k, t in v.items()}

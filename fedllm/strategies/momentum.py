"""FedAvg-M and SCAFFOLD-M — Cheng, Huang, Wu & Yuan, "Momentum Benefits Non-IID Federated
Learning Simply and Provably" (ICLR 2024), Algorithms 1 and 2: `fedavg_client_momentum` (was
`fedavg_m`) and `scaffold_m`. Not `fedavgm` (Hsu et al. 2019), whose momentum is in the server step.

Both keep a server momentum g, the average local direction of the last round, broadcast
to the clients, and blend it into every local step:

    FedAvg-M    v = β ∇f_i(w) + (1−β) g
    SCAFFOLD-M  v = β (∇f_i(w) − c_i + c) + (1−β) g          w ← w − η_l v

Server: g⁺ = mean_S (x^t − x_i)/(η_l K) = −mean_S Δ_i/(η_l K), then x ← x − γ g⁺.
SCAFFOLD-M also refreshes the control variates: c_i⁺ = (1/K) Σ_k ∇f_i(w_k) (the mean raw
local gradient — with β = 1 and plain SGD this equals SCAFFOLD's option II), and
c += (1/N) Σ_S (c_i⁺ − c_i), as in scaffold.py.

With β = 1, FedAvg-M is FedAvg with server step γ/(η_l K). γ defaults to η_l K, the step
that makes β = 1 exactly FedAvg; g starts at 0. The g⁺ formula assumes the local optimizer
is SGD (`client.optim: sgd`): it reads the mean direction back from the update.
"""
from __future__ import annotations

import torch

from fedllm.registry import STRATEGIES
from fedllm.strategies.base import ClientHooks, RoundInfo, State, Strategy, strip_prefix, with_prefix
from fedllm.strategies.scaffold import C, DC, ControlVariates, float_zeros, on_params, stepped, update_server_c

G = "g."


class MomentumHooks(ClientHooks):
    """FedAvg-M's client: the gradient becomes β·grad + (1−β)·g."""

    def __init__(self, beta: float):
        self.beta = beta

    @torch.no_grad()
    def begin(self, params, ctx):
        self.g = {k: t.to(params[k].dtype) for k, t in on_params(strip_prefix(ctx.broadcast, G), params).items()}

    @torch.no_grad()
    def direction(self, params, corrected: State) -> None:
        for k, p in params.items():
            p.grad = self.beta * corrected[k] + (1 - self.beta) * self.g[k]

    def before_step(self, params, regrad):
        self.direction(params, {k: p.grad if p.grad is not None else torch.zeros_like(p) for k, p in params.items()})


class ScaffoldMomentumHooks(MomentumHooks):
    """SCAFFOLD-M's client: β(grad − c_i + c) + (1−β)g, and c_i⁺ = the mean raw gradient."""

    @torch.no_grad()
    def begin(self, params, ctx):
        super().begin(params, ctx)
        self.cv = ControlVariates(params, ctx.broadcast, ctx.client_state)
        self.correction = {k: t.to(params[k].dtype) for k, t in self.cv.correction().items()}
        self.grad_sum = {k: torch.zeros_like(t) for k, t in self.cv.c.items()}
        self.steps = 0

    @torch.no_grad()
    def before_step(self, params, regrad):
        raw = {k: p.grad if p.grad is not None else torch.zeros_like(p) for k, p in params.items()}
        for k, g in raw.items():
            self.grad_sum[k].add_(g.to(self.grad_sum[k]))
        self.steps += 1
        self.direction(params, {k: g + self.correction[k] for k, g in raw.items()})

    def finish(self, params, update):
        if self.steps == 0:
            return self.cv.refreshed(self.cv.c_i)
        return self.cv.refreshed({k: t / self.steps for k, t in self.grad_sum.items()})


@STRATEGIES.register("fedavg_client_momentum", deprecated_aliases=("fedavg_m",))
class FedAvgMomentum(Strategy):
    """FedAvg-M: local direction β∇f + (1−β)g; g = mean(x^t − x_i)/(η_l K); x −= γ g."""
    local_optimizer = "sgd"  # g is read back from the update as the mean SGD direction (Cheng et al. 2024, Alg. 1)

    uniform_weights = True  # Alg. 1 averages over S unweighted

    def __init__(self, beta: float = 0.5, server_lr: float | None = None):
        if not 0 < beta <= 1:
            raise ValueError(f"{type(self).__name__}: beta must be in (0, 1], got {beta}")
        if server_lr is not None and server_lr <= 0:
            raise ValueError(f"{type(self).__name__}: server_lr (γ) must be > 0 or null (= η_l·K)")
        self.beta, self.server_lr = beta, server_lr

    def init(self, global_state: State) -> State:
        return with_prefix(float_zeros(global_state), G)

    def broadcast(self, server_state: State) -> State:
        return dict(server_state)

    def client_hooks(self, round: int, client_id: int):
        return MomentumHooks(self.beta)

    def momentum_step(self, global_state: State, delta: State, info: RoundInfo) -> tuple[State, State]:
        """(x − γ g⁺, g⁺) with g⁺ = −mean Δ/(η_l K)."""
        if not info.local_steps or not info.lr:
            raise ValueError(
                f"{type(self).__name__} reads the mean local direction as −Δ/(η_l·K): set client.max_steps (K) "
                "instead of client.num_train_epochs"
            )
        scale = info.lr * info.local_steps
        g = {k: -t / scale for k, t in delta.items()}
        gamma = self.server_lr if self.server_lr is not None else scale
        return stepped(global_state, g, -gamma), with_prefix(g, G)

    def aggregate(self, global_state: State, mean_update: State, server_state: State, info: RoundInfo):
        delta = mean_update.delta
        return self.momentum_step(global_state, delta, info)


@STRATEGIES.register("scaffold_m")
class ScaffoldMomentum(FedAvgMomentum):
    """SCAFFOLD-M: local direction β(∇f − c_i + c) + (1−β)g; SCAFFOLD control variates + server momentum g."""

    def init(self, global_state: State) -> State:
        return {**super().init(global_state), **with_prefix(float_zeros(global_state), C)}

    def client_hooks(self, round: int, client_id: int):
        return ScaffoldMomentumHooks(self.beta)

    def extras_like(self, global_state: State) -> State:
        return with_prefix(float_zeros(global_state), DC)

    def aggregate(self, global_state: State, mean_update: State, server_state: State, info: RoundInfo):
        delta, extras = mean_update.delta, mean_update.extras
        new_global, g = self.momentum_step(global_state, delta, info)
        return new_global, {**g, **update_server_c(server_state, extras, info)}

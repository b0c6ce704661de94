"""FedSpeed — Sun et al., "FedSpeed: Larger Local Interval, Less Communication Round, and
Higher Generalization Accuracy" (ICLR 2023), in the form of the authors' code
(woodenchild95/FL-Simulator: client/fedspeed.py, optimizer/ESAM.py, server/FedSpeed.py).

Client i, every local step on one batch ξ:
    g1 = ∇f(w; ξ);  e = ρ g1/(‖g1‖ + 1e-7);  g2 = ∇f(w + e; ξ);  restore w
    step with  g2 + λ(w − x^t + h_i)
(the code adds λ(h_i − x^t) by a backward pass and λw as SGD weight decay). Server, with the
participants' updates Δ_i = w_i − x^t:
    h_i += Δ_i (i ∈ S);   x^{t+1} = mean_S(w_i) + mean_N(h_j) = x^t + mean_S Δ_i + (1/N) Σ_j h_j

Sign convention (the code's, not the paper's ĥ = −h/λ): h_i accumulates the client's own
updates, so at a fixed point λh_i = −∇f_i(x) and Σ_j h_j = 0, i.e. Σ_i ∇f_i(x) = 0.

State: every h_i in the client store (the client adds its own Δ_i, the same Δ_i the server
receives — exact unless a lossy codec alters it on the wire), and Σ_j h_j in the server
state, advanced by |S|·mean_S Δ_i, so the server needs nothing beyond the update itself.

Clipping: the code clips g2 + λ(h_i − x^t) at norm 10 and applies λw unclipped (weight
decay). Here the whole corrected gradient goes through the engine's `client.max_grad_norm`
(set it to 10 to match the code); the two differ only in steps where the clip binds.
"""
from __future__ import annotations

import torch

from fedllm.registry import STRATEGIES
from fedllm.strategies.base import ClientHooks, RoundInfo, State, Strategy, strip_prefix, with_prefix
from fedllm.strategies.scaffold import float_zeros, on_params, stepped

H, H_SUM = "h.", "h_sum."


@torch.no_grad()
def sharpness_ascent(params: dict[str, torch.nn.Parameter], regrad, rho: float) -> None:
    """Replaces each p.grad by ∇f(w + e) on the same batch, e = ρ g/‖g‖ over the whole
    adapter (ESAM.first_step/second_step), and puts w back exactly."""
    grads = [p.grad for p in params.values() if p.grad is not None]
    if not grads:
        return
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    scale = rho / (norm + 1e-7)
    saved = {k: p.detach().clone() for k, p in params.items()}
    for p in params.values():
        if p.grad is not None:
            p.add_(p.grad * scale.to(p.grad))
    with torch.enable_grad():
        regrad()
    for k, p in params.items():
        p.copy_(saved[k])


class FedSpeedHooks(ClientHooks):
    def __init__(self, rho: float, lam: float):
        self.rho, self.lam = rho, lam

    @torch.no_grad()
    def begin(self, params, ctx):
        self.h = on_params(strip_prefix(ctx.client_state, H), params)
        # λ(w − x^t + h_i) = λ(w + shift): precompute shift = h_i − x^t once per round
        x_t = on_params(ctx.global_state, params)
        self.shift = {k: self.h[k] - x_t[k] for k in params}

    @torch.no_grad()
    def before_step(self, params, regrad):
        if self.rho > 0:  # ρ = 0 is plain prox-correction: skip the second pass
            sharpness_ascent(params, regrad, self.rho)
        for k, p in params.items():
            correction = self.lam * (p.detach().to(self.shift[k].dtype) + self.shift[k])
            if p.grad is None:
                p.grad = correction.to(p.dtype)
            else:
                p.grad.add_(correction.to(p.dtype))

    @torch.no_grad()
    def finish(self, params, update):
        new_h = {k: self.h[k] + update[k].to(self.h[k]) for k in self.h}
        return {}, with_prefix(new_h, H)


@STRATEGIES.register("fedspeed")
class FedSpeed(Strategy):
    """FedSpeed: sharpness ascent ρ + prox-correction λ(w − x^t + h_i); x = mean_S w_i + mean_N h_j."""
    local_optimizer = "sgd"  # the prox-correction and λw terms are SGD steps (Sun et al. 2023, Alg. 1)

    uniform_weights = True  # mean_S(w_i): the code averages the participants unweighted

    def __init__(self, rho: float = 0.1, lam: float = 0.1):
        # defaults: FL-Simulator's train.py (--rho 0.1, --lamb 0.1)
        if rho < 0 or lam < 0:
            raise ValueError("fedspeed: rho and lam must be ≥ 0")
        self.rho, self.lam = rho, lam
        self.client_needs = frozenset({"regrad"}) if rho > 0 else frozenset()  # the ascent re-grads the batch

    def init(self, global_state: State) -> State:
        return with_prefix(float_zeros(global_state), H_SUM)

    def client_hooks(self, round: int, client_id: int):
        return FedSpeedHooks(self.rho, self.lam)

    def aggregate(self, global_state: State, mean_update: State, server_state: State, info: RoundInfo):
        delta = mean_update.delta
        h_sum = stepped(strip_prefix(server_state, H_SUM), delta, float(len(info.clients)))
        mean_h = {k: t / info.num_clients for k, t in h_sum.items()}
        new_global = stepped(stepped(global_state, delta, 1.0), mean_h, 1.0)
        return new_global, with_prefix(h_sum, H_SUM)

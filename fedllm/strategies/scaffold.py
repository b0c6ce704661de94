"""SCAFFOLD — Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning" (ICML 2020), Algorithm 1 with option II control variates.

Client i corrects every local gradient by c − c_i (Alg. 1 line 10), then refreshes its
control variate from its own update (option II, Eq. 4):

    c_i⁺ = c_i − c + (x^t − y_i)/(K η_l) = c_i − c − Δ_i/(K η_l)

and uploads Δc_i = c_i⁺ − c_i beside Δ_i. The server (Alg. 1 lines 16–17) applies

    x += η_g · mean_S Δ_i,        c += (1/N) Σ_S Δc_i = (|S|/N) · mean_S Δc_i.

c is server state (broadcast every round); every c_i lives in the client store, which the
server holds and checkpoints, so a client that skips rounds keeps its c_i. Means are
unweighted (Alg. 1 averages over S), hence `uniform_weights`.
"""
from __future__ import annotations

import torch

from fedllm.registry import STRATEGIES
from fedllm.strategies.base import ClientHooks, RoundInfo, State, Strategy, strip_prefix, with_prefix

C, C_I, DC = "c.", "c_i.", "dc."


def float_zeros(state: State) -> State:
    """Zeros shaped like `state`, at least fp32 (server state must not live in bf16)."""
    return {k: torch.zeros_like(t, dtype=torch.promote_types(t.dtype, torch.float32)) for k, t in state.items()}


def stepped(x: State, d: State, scale: float) -> State:
    """x + scale·d in the dtype of x (unlike `add_scaled`, fp64 stays fp64: the quadratic
    benchmarks resolve errors far below fp32 rounding)."""
    return {k: x[k] + scale * d[k].to(x[k].dtype) for k in x}


def on_params(state: State, params: dict[str, torch.nn.Parameter]) -> State:
    """A copy of `state[k]` (or zeros) on each parameter's device, at least
    fp32 — a copy, because the broadcast dict is shared by every client of the round."""
    out = {}
    for k, p in params.items():
        t = state.get(k)
        dtype = torch.promote_types(p.dtype, torch.float32)
        out[k] = torch.zeros_like(p, dtype=dtype) if t is None else t.to(p.device, dtype, copy=True)
    return out


class ControlVariates:
    """The client's view of (c, c_i) for one round — shared by SCAFFOLD and SCAFFOLD-M."""

    def __init__(self, params: dict[str, torch.nn.Parameter], broadcast: State, client_state: State):
        self.c = on_params(strip_prefix(broadcast, C), params)
        self.c_i = on_params(strip_prefix(client_state, C_I), params)

    def correction(self) -> State:
        return {k: self.c[k] - self.c_i[k] for k in self.c}

    def refreshed(self, new_c_i: State) -> tuple[State, State]:
        """(extras to upload: Δc_i, the client's new stored state: c_i⁺)."""
        delta = {k: new_c_i[k] - self.c_i[k] for k in new_c_i}
        return with_prefix(delta, DC), with_prefix(new_c_i, C_I)


def update_server_c(server_state: State, extras: State, info: RoundInfo) -> State:
    """c += (|S|/N) · mean_S Δc_i   (Alg. 1 line 17, written with the unweighted mean)."""
    dc = strip_prefix(extras, DC)
    share = len(info.clients) / info.num_clients
    return {C + k: server_state[C + k] + share * dc[k].to(server_state[C + k].dtype) for k in dc}


class ScaffoldHooks(ClientHooks):
    @torch.no_grad()
    def begin(self, params, ctx):
        self.steps, self.lr = ctx.steps, ctx.lr
        self.cv = ControlVariates(params, ctx.broadcast, ctx.client_state)
        self.correction = {k: t.to(params[k].dtype) for k, t in self.cv.correction().items()}

    @torch.no_grad()
    def before_step(self, params, regrad):
        # Alg. 1 line 10: y ← y − η_l (g_i(y) − c_i + c); a parameter without a gradient
        # still moves by the correction.
        for k, p in params.items():
            if p.grad is None:
                p.grad = self.correction[k].clone()
            else:
                p.grad.add_(self.correction[k])

    @torch.no_grad()
    def finish(self, params, update):
        if self.steps == 0:  # no local step: nothing to learn c_i from
            return self.cv.refreshed(self.cv.c_i)
        scale = 1.0 / (self.steps * self.lr)
        new_c_i = {k: self.cv.c_i[k] - self.cv.c[k] - scale * update[k].to(self.cv.c[k]) for k in self.cv.c}
        return self.cv.refreshed(new_c_i)


@STRATEGIES.register("scaffold")
class Scaffold(Strategy):
    """SCAFFOLD: client gradients corrected by c − c_i (option II control variates)."""
    local_optimizer = "sgd"  # c − c_i corrects SGD steps (Karimireddy et al. 2020, Alg. 1)

    uniform_weights = True

    def __init__(self, server_lr: float = 1.0):
        if server_lr <= 0:
            raise ValueError("scaffold: server_lr must be > 0")
        self.server_lr = server_lr

    def init(self, global_state: State) -> State:
        return with_prefix(float_zeros(global_state), C)

    def broadcast(self, server_state: State) -> State:
        return {k: t for k, t in server_state.items() if k.startswith(C)}

    def client_hooks(self, round: int, client_id: int):
        return ScaffoldHooks()

    def extras_like(self, global_state: State) -> State:
        return with_prefix(float_zeros(global_state), DC)

    def aggregate(self, global_state: State, mean_update: State, server_state: State, info: RoundInfo):
        delta, extras = mean_update.delta, mean_update.extras
        return stepped(global_state, delta, self.server_lr), update_server_c(server_state, extras, info)

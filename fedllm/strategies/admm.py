"""Consensus ADMM over noisy links: the noise-robust variant of Lari, Arablouei, Gogineni,
Werner, "Noise-Robust and Resource-Efficient ADMM-based Federated Learning" (arXiv
2409.13451), and the standard consensus ADMM it improves on (Boyd et al. 2011, §7.1).

Problem: min Σ_i f_i(w_i) s.t. w_i = z. Augmented Lagrangian per client,
L_i = f_i(w) + λ_iᵀ(w − z) + (ρ/2)‖w − z‖².

`admm` — standard consensus ADMM (Boyd §7.1, Eq. 7.6–7.7), clients sending their local model:
    w_i ← argmin L_i(w; λ_i, z̃)             (z̃: the global model as received, noisy)
    z   ← mean_i w_i                         (Boyd 7.7: the duals average to zero)
    λ_i ← λ_i + ρ(w_i − z̃)                   (done when client i next receives z̃)
A noisy z̃ (and noisy uplinks) break Σ_i λ_i = 0: that sum is a random walk driven by the
link noise, and the fixed point z − w* = −(Σ∇²f_i)⁻¹ Σλ_i walks with it (cumulative noise).

`noise_robust_admm` — the dual eliminated. Source: the paper's full text was not reachable
offline (its equation numbers are not cited here); the rule is the one in the first author's
published simulation code, github.com/ehsan-lari/RERCE_Fed (src/RERCE_Fed.m, and
RERCE_Fed_ContinualUpdates.m, "based on" the Signal Processing 2025 version). For WLS,
f_i = ½(y_i − H_iw)ᵀW_i(y_i − H_iw), R_i = H_iᵀW_iH_i, that code runs
    w_i¹ = (R_i + ρI)⁻¹ H_iᵀW_iy_i                    (first iteration, from z⁰ = 0, λ⁰ = 0)
    w_i⁺ = (I − ρ(R_i + ρI)⁻¹) w_i + ρ(R_i + ρI)⁻¹ z̃  (one noisy global model z̃; no dual kept)
i.e. w_i⁺ = argmin f_i(w) − ∇f_i(w_i)ᵀw + (ρ/2)‖w − z̃‖², and, in the continual-updates code,
    uplink s_i = 2w_i⁺ − w_i;   z = mean over all N of each client's latest s_i   (`form: paper`)
(src/RERCE_Fed.m, without continual updates, uploads w_i⁺, averages only that iteration's
clients and broadcasts 2z − z_old; that server-side variant is not built.)
This is consensus ADMM (Boyd 7.6–7.7) with λ_i eliminated through the exact local solve:
λ_iⁿ = −∇f_i(w_iⁿ) − ρ(zⁿ − zⁿ⁻¹), so z̃ stands for 2zⁿ − zⁿ⁻¹, which one message carries (the
standard form's client combines two noisy receptions). The data enter only through w_i¹:
Σ_i λ_i = 0 is a conserved quantity that every inexact local solve, stale table entry (partial
participation) and link-noise draw perturbs for good, so the fixed point drifts with them.
`form: gradient` (the default; the closest form we found that survives those): same client
update, uplink u_i = w_i⁺ − ∇f_i(w_i⁺)/ρ = w_i⁺ + λ_i⁺/ρ with λ_i⁺ = −∇f_i(w_i⁺) (Boyd 7.6's
z-term), z = mean_i u_i. Fixed point: w_i = z and Σ∇f_i(z) = 0, i.e. z = w*, however inexact
the solve; the data enter every uplink, so link noise is not integrated: it stays at a floor.
Unscheduled clients keep updating locally (the paper's second change, `idle_updates`; the
code's unscheduled clients iterate toward the last z̃ they received): a client that missed m
rounds runs min(m, `max_idle_iterations`) further iterations toward that z̃ — computed lazily
when it is next scheduled, which gives the same numbers as computing them eagerly, since they
depend only on its own state. A client not yet heard from counts as x⁰ in the server's mean
(the code has every client upload at the first iteration).

For adapters (inexact local SGD): each iteration is the local loop's K steps on L_i with
the gradient corrected by −∇f_i(w_i) + ρ(w − z̃) (∇f_i(w_i): the full local gradient at the
iteration's start, `gradient_examples` caps the examples it uses); the client's w_i, ∇f_i(w_i)
and last z̃ live in the client store. The upload is s_i or u_i (a model, in place of Δ — what
the paper transmits), so a noisy link's SNR is relative to the model.

Defaults: ρ = 1 (the code's default), `form: gradient`, idle updates on, capped at 10 missed
iterations. Measured on the WLS reference (tests/strategies/test_admm_wls.py: N=10, d=5, the real
Client with K=10 gradient steps, lr 0.2, ρ=1), ‖z − w*‖²: clean links, all clients — gradient
7e-16, admm 4e-14, paper 3.3e-5 (stuck: the K-step solve is inexact); 3 of 10 per round —
gradient 4e-13, paper 0.055 (stuck); independent noise σ=0.02 on every download and upload,
mean over iterations 100–200 — gradient 2.9e-4, paper 1.04e-2, admm 1.0e-2. In numpy with
exact solves, `paper` and `admm` give the same error under full participation and both grow
without bound (0.014 → 0.25 from iteration 150 to 4500) while `gradient` stays at 8e-5; in the
code's own setting (N=100, L=128, 4 clients per iteration, W_i = 10⁴I, so R_i ≫ ρ) the drift
is too slow to see: −23.3 dB NMSD from iteration 250 to 4000 at noise variance 1e-2. There
the gradient form diverges at ρ = 1 even on clean links (its server step is a gradient step
of size 1/ρ; R_i ~ 10⁶); at ρ = 10⁶ it converges (−41 dB clean at 300 iterations) with a
floor near −20 dB: neither form dominates; raise ρ if `gradient` diverges.
Server memory: the latest upload of every client heard from (≤ N × the adapter) and x⁰.
"""
from __future__ import annotations

import torch

from fedllm.registry import STRATEGIES, RecipeError
from fedllm.strategies.base import ALL, ClientHooks, RoundInfo, State, Strategy, strip_prefix

W, G, Z, LAM, SEEN, LAST, X0 = "w.", "g.", "z.", "lam.", "seen", "last_round", "x0."


def on(params: dict, state: State) -> State:
    """A float copy of `state` on each parameter's device (never aliasing the broadcast)."""
    return {k: state[k].to(p.device, torch.promote_types(p.dtype, torch.float32), copy=True) for k, p in params.items()}


class ConsensusServer(Strategy):
    """z = mean over all N clients of each one's latest upload (x⁰ for one not yet heard from)."""

    needs = ALL
    uniform_weights = True
    client_needs = frozenset({"full_gradient", "variable_steps"})  # λ_i = −∇f_i(w_i); idle iterations

    def __init__(self, rho: float):
        if rho <= 0:
            raise RecipeError(f"{type(self).__name__.lower()}: rho must be > 0")
        self.rho, self.last_round = rho, None

    def init(self, global_state: State) -> State:
        # the table of uploads grows as clients are first heard from
        return {**{X0 + k: t.float().clone() for k, t in global_state.items()}, LAST: torch.zeros(0, dtype=torch.float64)}

    def aggregate(self, global_state: State, updates, server_state: State, info: RoundInfo):
        table = dict(server_state)
        last = table[LAST].clone()  # the kept state must stay as it was if this round's aggregate is refused
        for client_id, update, _ in updates:
            for k, t in update.delta.items():  # the upload is the model itself (see the hooks)
                table[f"u{client_id}.{k}"] = t.float()
            if client_id >= len(last):
                last = torch.cat([last, torch.full((client_id + 1 - len(last),), -1.0, dtype=torch.float64)])
            last[client_id] = info.round
        heard = [i for i in range(len(last)) if last[i] >= 0]
        n = max(info.num_clients, len(heard))
        z = {k: (sum(table[f"u{i}.{k}"] for i in heard) + (n - len(heard)) * table[X0 + k]) / n for k in global_state}
        return {k: z[k].to(global_state[k].dtype) for k in global_state}, {**table, LAST: last}

    def broadcast(self, server_state: State) -> State:
        # Nothing is sent; the round each client last took part is read here, before the
        # round's client hooks are made, so that they know the idle iterations a client owes.
        self.last_round = server_state[LAST]
        return {}


class AdmmHooks(ClientHooks):
    """Shared local iteration: K steps on L_i, gradient + λ + ρ(w − z̃)."""

    rewrites_update = True

    def __init__(self, rho: float):
        self.rho = rho

    @torch.no_grad()
    def load_local_model(self, params, w: State) -> None:
        for k, p in params.items():
            p.copy_(w[k].to(p.dtype))

    @torch.no_grad()
    def before_step(self, params, regrad):
        for k, p in params.items():
            correction = self.lam[k] + self.rho * (p.detach().to(self.lam[k].dtype) - self.anchor[k])
            p.grad = correction.to(p.dtype) if p.grad is None else p.grad.add_(correction.to(p.grad.dtype))

    @torch.no_grad()
    def send(self, update, model: State, x_t: State) -> None:
        # the upload is the model (u_i or w_i), not Δ: the server's table holds models
        for k in update:
            update[k] = model[k].float().to(update[k].device)


class StandardHooks(AdmmHooks):
    def begin(self, params, ctx):
        self.x_t = on(params, ctx.global_state)  # z̃, as received
        stored = ctx.client_state
        self.lam = on(params, strip_prefix(stored, LAM)) if SEEN in stored else {k: torch.zeros_like(v) for k, v in self.x_t.items()}
        if SEEN in stored:  # Boyd 7.6's dual step with the new z, deferred to when it arrives
            w = on(params, strip_prefix(stored, W))
            for k in self.lam:
                self.lam[k] += self.rho * (w[k] - self.x_t[k])
        self.anchor = self.x_t  # local training starts from z̃ (the Client loaded it)

    def finish(self, params, update):
        w = {k: p.detach().float() for k, p in params.items()}
        self.send(update, w, self.x_t)
        state = {**{W + k: t.cpu() for k, t in w.items()}, **{LAM + k: t.cpu() for k, t in self.lam.items()}}
        return {}, {**state, SEEN: torch.ones(1)}


class RobustHooks(AdmmHooks):
    def __init__(self, rho: float, idle: int, limit: int | None, form: str):
        super().__init__(rho)
        self.idle, self.limit, self.form = idle, limit, form  # idle: iterations owed for the rounds it missed

    def num_steps(self, default: int) -> int:
        self.per_iteration = default
        return default * (1 + self.idle)

    def begin(self, params, ctx):
        stored, self.gradient, self.steps_done = ctx.client_state, ctx.gradient, 0
        self.x_t = on(params, ctx.global_state)  # this round's z̃
        if SEEN in stored:
            self.load_local_model(params, on(params, strip_prefix(stored, W)))
            self.lam = {k: -t for k, t in on(params, strip_prefix(stored, G)).items()}  # λ_i = −∇f_i(w_i)
            self.anchor = on(params, strip_prefix(stored, Z)) if self.idle else self.x_t
        else:  # first iteration: λ⁰ = 0, from z̃ (the code's w_i¹ = (R_i + ρI)⁻¹ p_i from z⁰ = 0), nothing owed
            self.lam = {k: torch.zeros_like(t) for k, t in self.x_t.items()}
            self.anchor, self.idle = self.x_t, 0
        self.w_prev = {k: p.detach().to(self.x_t[k].dtype, copy=True) for k, p in params.items()}

    def local_gradient(self, params) -> State:
        return on(params, self.gradient(self.limit))

    @torch.no_grad()
    def before_step(self, params, regrad):
        if self.steps_done and self.steps_done % self.per_iteration == 0:  # an idle iteration ended
            grads = {k: None if p.grad is None else p.grad.clone() for k, p in params.items()}
            with torch.enable_grad():
                self.lam = {k: -t for k, t in self.local_gradient(params).items()}
            for k, p in params.items():
                p.grad = grads[k]
            self.w_prev = {k: p.detach().to(self.x_t[k].dtype, copy=True) for k, p in params.items()}
            if self.steps_done == self.per_iteration * self.idle:  # the last one: this round's z̃
                self.anchor = self.x_t
        self.steps_done += 1
        super().before_step(params, regrad)

    def finish(self, params, update):
        with torch.enable_grad():
            g = self.local_gradient(params)  # ∇f_i(w_i⁺): the next iteration's λ
        w = {k: p.detach().float() for k, p in params.items()}
        if self.form == "paper":  # the code's s_i = 2w_i⁺ − w_i
            u = {k: 2 * w[k] - self.w_prev[k].float() for k in w}
        else:  # w_i⁺ + λ_i⁺/ρ, Boyd 7.6's z-term with λ_i⁺ = −∇f_i(w_i⁺)
            u = {k: w[k] - g[k] / self.rho for k in w}
        self.send(update, u, self.x_t)
        state = {**{W + k: t.cpu() for k, t in w.items()}, **{G + k: t.cpu() for k, t in g.items()},
                 **{Z + k: t.cpu() for k, t in self.x_t.items()}}
        return {}, {**state, SEEN: torch.ones(1)}


@STRATEGIES.register("admm")
class Admm(ConsensusServer):
    """Standard consensus ADMM (Boyd §7.1): clients keep a dual λ_i and send w_i; z = mean w_i."""

    def __init__(self, rho: float = 1.0):
        super().__init__(rho)

    def client_hooks(self, round: int, client_id: int):
        return StandardHooks(self.rho)


@STRATEGIES.register("noise_robust_admm")
class NoiseRobustAdmm(ConsensusServer):
    """Noise-robust ADMM (Lari et al. 2024): the dual eliminated, one noisy z̃ per iteration, unscheduled
    clients keep iterating; uplink 2w_i⁺ − w_i (`form: paper`) or w_i⁺ − ∇f_i(w_i⁺)/ρ (`form: gradient`)."""

    def __init__(self, rho: float = 1.0, form: str = "gradient", idle_updates: bool = True, max_idle_iterations: int = 10,
                 gradient_examples: int | None = None):
        super().__init__(rho)
        if form not in ("paper", "gradient"):
            raise RecipeError(f"noise_robust_admm: form must be paper or gradient, not {form!r}")
        if max_idle_iterations < 0 or (gradient_examples is not None and gradient_examples < 1):
            raise RecipeError("noise_robust_admm: max_idle_iterations must be ≥ 0 and gradient_examples ≥ 1")
        self.form, self.idle_updates, self.max_idle, self.limit = form, idle_updates, max_idle_iterations, gradient_examples

    def client_hooks(self, round: int, client_id: int):
        known = self.last_round is not None and client_id < len(self.last_round)
        last = int(self.last_round[client_id]) if known else -1
        missed = round - last - 1 if self.idle_updates and last >= 0 else 0
        return RobustHooks(self.rho, min(max(missed, 0), self.max_idle), self.limit, self.form)

"""DP-BREM — Gu, Xiong et al., "DP-BREM: Differentially-Private and Byzantine-Robust
Federated Learning with Client Momentum" (USENIX Security 2025, arXiv 2306.12608; code
Emory-AIMS/DP-BREM, `train.py`). Record-level DP for cross-silo FL with a trusted server.

Round t, T planned rounds, f = t/T, schedules as the official code: R_t = R(1 − 0.7f),
C_t = C(1 − 0.7f) (both shrink linearly to 0.3×), η_t = η(1 + (r − 1)f) (to r·η).

- Client i (one gradient per round, at x^t): g_i = (1/b) Σ_j clip(∇ℓ_j, R_t) over its b
  examples of the step, then m_i = (1 − β) g_i + β m_i, kept in the client store and sent.
  The local optimiser does not move: the message is the momentum.
- Server (centered clipping around the global momentum M, then noise on the sum):
      u_i = clip(m_i − M, C_t),   M += (Σ_{i∈S} u_i + N(0, σ²R_t²·I)) / |S|,   x −= η_t M.

Accounting (per client, record level, add/remove one record). One record moves g_i by at
most R_t/b; through the momentum it moves m_i by at most s_i, with s_i ← (1−β)R_t/b + β s_i
at each of the client's rounds, and the (1-Lipschitz) centered clip does not enlarge that.
Each round the client takes part in is then a Gaussian mechanism with z = σR_t / s_i, which
is what the ledger composes — a sound bound that takes no credit for record sampling,
because the momentum carries a record's past samples into every later round. With β = 0
the round only depends on this round's batch, and it is the Poisson-subsampled Gaussian
(rate b/n_i, z = σb), with the shuffled-batch caveat of `dp_sgd`. The official code has no
accountant; the paper's own analysis may be tighter — this one is what we can vouch for.

Differences from the official code: a client updates its momentum only in the rounds it is
sampled (the official loop updates every honest client every round when β > 0), and the
batch mean divides by the step's fixed b rather than the realised Poisson batch size.

In a client group (`federation.group_size` G) each rank clips its b examples of the group's
draw and the group adds the sums, so g_i is the mean over G·b examples and b above is the
group's batch G·b (RunInfo.batch_size counts G).

The budget and `noise_seed` come from the recipe's `privacy:` section; the server's noise is
secret unless `noise_seed` is set, and its generator is server state (`fedllm.privacy.budget`)."""
from __future__ import annotations

import torch

from fedllm.privacy.accountant import Event, Ledger, calibrate
from fedllm.privacy.budget import NOISE, PREFIX, Budget, add_noise, check_privacy, flat_norm, generator_from, noise_state
from fedllm.privacy.dp_sgd import ClippedSums
from fedllm.registry import STRATEGIES
from fedllm.strategies.base import ALL, ClientHooks, RoundInfo, State, Strategy

MOMENTUM, LEDGERS, SENSITIVITY = "momentum.", PREFIX + "ledger/", PREFIX + "sensitivity"


class ClientMomentum(ClientHooks):
    """One clipped-mean gradient at x^t, folded into the client's momentum, sent in place of Δ."""

    rewrites_update = True
    sums_in_group = True  # a client group's ranks add their clipped sums: g_i over the group's G·b examples

    def __init__(self, clip: float, beta: float):
        self.clip, self.beta = clip, beta

    def num_steps(self, default):
        return 1

    def begin(self, params, ctx):
        self.clipped, self.gradient = ClippedSums(params, self.clip, "dp_brem", ctx=ctx), None
        self.previous = {k: ctx.client_state.get(MOMENTUM + k) for k in params}

    def backward(self, inputs, loss_of, default):
        return self.clipped.add(inputs, loss_of)

    @torch.no_grad()
    def before_step(self, params, regrad):
        sums, count = self.clipped.take()
        self.gradient = {k: s / count for k, s in sums.items()}
        for p in params.values():
            p.grad = None  # nothing to step on: the server moves the model

    @torch.no_grad()
    def finish(self, params, update):
        momentum = {}
        for k, t in update.items():
            g = self.gradient[k].to(t) if self.gradient else torch.zeros_like(t)
            previous = self.previous[k]
            momentum[k] = (1 - self.beta) * g + (self.beta * previous.to(t) if previous is not None else 0)
            t.copy_(momentum[k])  # the engine sends this dict: the message is m_i
        return {}, {MOMENTUM + k: m for k, m in momentum.items()}


@STRATEGIES.register("dp_brem")
class DPBREM(Strategy):
    """DP-BREM: client momentum, centered clipping around the global momentum, noise on the sum."""

    needs = ALL  # centered clipping needs every client's momentum
    client_needs = frozenset({"per_example", "variable_steps"})  # per-example clipping; one step
    uniform_weights = True
    clips_client_gradients = True  # per example, with record_clip
    per_example_in_groups = True  # no client noise: a client group only adds its clipped sums
    check_privacy = staticmethod(check_privacy)  # reads the recipe's privacy: section

    def __init__(
        self,
        server_lr: float = 0.1,  # η (official default)
        final_lr_ratio: float = 0.1,  # η decays linearly to this fraction
        momentum: float = 0.9,  # β, the client momentum
        record_clip: float = 10.0,  # R, per-example clipping norm
        client_clip: float = 5.0,  # C, centered clipping radius
        final_clip_ratio: float = 0.3,  # R_t and C_t shrink linearly to this fraction
        # the budget (σ, noise std σ·R_t on the sum, or a target ε) is the recipe's privacy: section
    ):
        if not 0 <= momentum < 1:
            raise ValueError("dp_brem: momentum must be in [0, 1)")
        self.server_lr, self.final_lr_ratio, self.beta = server_lr, final_lr_ratio, momentum
        self.record_clip, self.client_clip, self.final_clip_ratio = record_clip, client_clip, final_clip_ratio
        self.budget = Budget.of("dp_brem")
        self.rounds, self.batch, self.rates = None, None, []

    # ---- schedules ---------------------------------------------------------------------
    def progress(self, round: int) -> float:
        if self.rounds is None:
            raise RuntimeError("dp_brem: the clip and lr schedules need the planned rounds from setup(run)")
        return min(round / self.rounds, 1.0)

    def clips(self, round: int) -> tuple[float, float]:
        shrink = 1 - (1 - self.final_clip_ratio) * self.progress(round)
        return self.record_clip * shrink, self.client_clip * shrink

    def lr(self, round: int) -> float:
        return self.server_lr * (1 + (self.final_lr_ratio - 1) * self.progress(round))

    # ---- accounting ----------------------------------------------------------------------
    def setup(self, run) -> None:
        self.rounds, self.batch = run.rounds, run.batch_size
        self.budget = Budget.of("dp_brem", run)
        self.rates = [min(1.0, run.batch_size / max(n, 1)) for n in run.client_sizes]
        if self.budget.target_epsilon is not None:
            worst = max(range(len(self.rates)), key=lambda i: self.rates[i])
            self.budget.noise_multiplier = calibrate(
                lambda sigma: self.planned_events(worst, sigma), self.budget.target_epsilon, self.budget.delta, self.budget.method
            )

    def event(self, client: int, round: int, sensitivity: float, sigma: float) -> tuple[Event, float]:
        """(the round's event for `client`, its sensitivity after the round)."""
        record_clip = self.clips(round)[0]
        if self.beta == 0:
            return Event(sigma * self.batch, "poisson", rate=self.rates[client]), record_clip / self.batch
        sensitivity = (1 - self.beta) * record_clip / self.batch + self.beta * sensitivity
        return Event(sigma * record_clip / sensitivity), sensitivity

    def planned_events(self, client: int, sigma: float) -> dict[Event, float]:
        ledger, s = Ledger(), 0.0
        for t in range(self.rounds):  # as if the client took part in every planned round
            event, s = self.event(client, t, s, sigma)
            ledger.compose(event)
        return ledger.events

    # ---- the strategy ----------------------------------------------------------------------
    def init(self, global_state: State) -> State:
        self.budget.require_noise()
        momentum = {MOMENTUM + k: torch.zeros_like(t, dtype=torch.float32) for k, t in global_state.items()}
        return {**momentum, NOISE: noise_state(self.budget.noise_seed, "dp-brem")}

    def client_hooks(self, round: int, client_id: int):
        return ClientMomentum(self.clips(round)[0], self.beta)

    def aggregate(self, global_state: State, kept, server_state: State, info: RoundInfo):
        record_clip, client_clip = self.clips(info.round)
        sigma = self.budget.require_noise()
        M = {k: server_state[MOMENTUM + k].float().cpu() for k in global_state}
        total = {k: torch.zeros_like(t) for k, t in M.items()}
        for _, message, _ in kept:
            diff = {k: message.delta[k].float().cpu() - M[k] for k in M}
            scale = min(1.0, client_clip / max(flat_norm(diff), 1e-12))
            for k in total:
                total[k] += scale * diff[k]
        generator = generator_from(server_state, self.budget.noise_seed, "dp-brem")
        noisy = add_noise(total, sigma * record_clip, generator)
        M = {k: M[k] + noisy[k] / len(kept) for k in M}
        eta = self.lr(info.round)
        new_global = {k: (t.float() - eta * M[k].to(t.device)).to(t.dtype) for k, t in global_state.items()}
        momentum = {MOMENTUM + k: m for k, m in M.items()}
        return new_global, {**momentum, NOISE: generator.get_state(), **self.account(server_state, info, sigma)}

    def account(self, server_state: State, info: RoundInfo, sigma: float) -> State:
        sensitivity = server_state.get(SENSITIVITY, torch.zeros(info.num_clients, dtype=torch.float64)).clone()
        ledgers = self.ledgers(server_state)
        for client in info.clients:
            event, sensitivity[client] = self.event(client, info.round, float(sensitivity[client]), sigma)
            ledgers.setdefault(client, Ledger()).compose(event)
        return {SENSITIVITY: sensitivity, **{f"{LEDGERS}{c}": ledger.state() for c, ledger in ledgers.items()}}

    def ledgers(self, server_state: State) -> dict[int, Ledger]:
        return {int(k[len(LEDGERS):]): Ledger(t) for k, t in server_state.items() if k.startswith(LEDGERS)}

    def metrics(self, server_state: State) -> dict:
        return self.budget.report(list(self.ledgers(server_state).values()))

    def stop_reason(self, round: int, server_state: State) -> str | None:
        sigma = self.budget.require_noise()
        sensitivity = server_state.get(SENSITIVITY, torch.zeros(len(self.rates), dtype=torch.float64))
        ledgers = self.ledgers(server_state)
        worst = 0.0
        for client in range(len(self.rates)):
            event, _ = self.event(client, round, float(sensitivity[client]), sigma)
            ledger = ledgers.get(client, Ledger()).copy().compose(event)
            worst = max(worst, ledger.epsilon(self.budget.delta, self.budget.method))
        return self.budget.stop_reason(round, worst)

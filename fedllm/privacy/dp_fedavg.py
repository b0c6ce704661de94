"""DP-FedAvg with client-level privacy — McMahan, Ramage, Talwar & Zhang, "Learning
Differentially Private Recurrent Language Models" (ICLR 2018), Algorithm 1 with the
fixed-denominator estimator and flat clipping.

Client k: Δ_k ← clip(Δ_k, S) = Δ_k · min(1, S/‖Δ_k‖) over the whole upload (adapter update
and any strategy extras, as one flat vector). Server, with m = clients per round:

    Δ̄ = (Σ_k clip(Δ_k) + N(0, z²S²·I)) / m          (noise std per coordinate: z·S/m)

and Δ̄ goes to the wrapped strategy (FedAvg by default: x += η_g Δ̄), so server momentum or
adaptive optimisers run on the privatised mean. One round is one DP event:
- every client in every round (m = N): a Gaussian mechanism with noise multiplier z under
  add/remove-one-client (the sum moves by ≤ S);
- m of N clients uniformly without replacement (the `uniform` sampler): the library's
  sampled-without-replacement Gaussian under replace-one-client, where the sum moves by
  ≤ 2S, so the event's multiplier is z/2.
- each client independently with probability q = m/N (the `poisson` sampler): the
  Poisson-subsampled Gaussian with multiplier z under add/remove-one-client (McMahan et al.
  2018, §2: m is then the expected round size, the fixed denominator qN). A round that
  samples nobody (or whose every update was rejected) still runs the mechanism: it releases
  the noise alone, N(0, z²S²·I)/m, and is accounted as one event in that round
  (`releases_when_empty`), so the released model does not tell that the round was empty.
  Caveat, as for dp_sgd: the amplification assumes nobody knows who was sampled, while the
  simulated sampler is seeded from the recipe seed.
Other samplers are refused. The ledger is server state (checkpointed); ε is reported after every round, and with a
budget the run stops before the round that would exceed it. The budget and `noise_seed`
come from the recipe's `privacy:` section; the noise is secret unless `noise_seed` is set
(`fedllm.privacy.budget`)."""
from __future__ import annotations

import torch

from fedllm.privacy.accountant import Event, Ledger, calibrate
from fedllm.privacy.budget import (
    NOISE, PREFIX, Budget, DelegatingHooks, PrivacyWrapper, add_noise, check_privacy, flat_norm, generator_from, noise_state,
    split_state,
)
from fedllm.registry import STRATEGIES, RecipeError
from fedllm.strategies.base import ALL, RoundInfo, State, Update
from fedllm.wire import split_extras, with_extras

LEDGER = PREFIX + "ledger"
ROUNDS = PREFIX + "rounds"  # rounds accounted so far (Poisson sampling: empty rounds count too)
SAMPLERS = ("uniform", "poisson")  # the samplers dp_fedavg can account for


class ClipUpload(DelegatingHooks):
    """Clips the client's whole upload (update + extras) to norm S, in place."""

    rewrites_update = True

    def __init__(self, inner, clip_norm: float):
        super().__init__(inner)
        self.clip_norm = clip_norm

    @torch.no_grad()
    def finish(self, params, update):
        extras, client_state = self.inner.finish(params, update)
        scale = min(1.0, self.clip_norm / max(flat_norm(update, extras), 1e-12))
        for t in update.values():  # the engine sends this dict: clip it where it lies
            t.mul_(scale)
        return {k: t * scale for k, t in extras.items()}, client_state


@STRATEGIES.register("dp_fedavg")
class DPFedAvg(PrivacyWrapper):
    """DP-FedAvg (client-level DP): flat clipping to S, noise z·S/m on the mean, accounted."""

    check_privacy = staticmethod(check_privacy)  # reads the recipe's privacy: section
    releases_when_empty = True  # the noise is released every round, sampled clients or not

    def __init__(
        self,
        inner: dict = {"name": "fedavg"},  # the (linear) strategy that receives the noisy mean
        clip_norm: float = 1.0,  # S; the budget (z or a target ε) is the recipe's privacy: section
    ):
        super().__init__(inner, "dp_fedavg")
        if self.needs == ALL:
            raise ValueError("dp_fedavg adds noise to the mean of the clipped updates: its inner strategy must be linear")
        if self.counts_in_extras:
            raise RecipeError(f"dp_fedavg clips and noises the whole upload, extras included, so inner strategy "
                              f"'{inner['name']}' would miscount the flags it sends: pick another inner strategy")
        if clip_norm <= 0:
            raise ValueError("dp_fedavg: clip_norm must be > 0")
        self.uniform_weights = True  # the mean is over clients, each clipped to S
        self.clip_norm = clip_norm
        self.budget = Budget.of("dp_fedavg")
        self.population, self.sample, self.poisson = None, None, False

    def setup(self, run) -> None:
        if run.sampler not in SAMPLERS:
            raise ValueError(f"dp_fedavg accounts for the {' and '.join(SAMPLERS)} client samplers; "
                             f"this run samples with '{run.sampler}'")
        super().setup(run)
        self.budget = Budget.of("dp_fedavg", run)
        self.population, self.sample = run.num_clients, run.clients_per_round
        self.poisson = run.sampler == "poisson"
        if self.budget.target_epsilon is not None:
            self.budget.noise_multiplier = calibrate(
                lambda z: {self.event(z): run.rounds}, self.budget.target_epsilon, self.budget.delta, self.budget.method
            )

    def event(self, z: float, population: int | None = None, sample: int | None = None) -> Event:
        n, m = population or self.population, sample or self.sample
        if m >= n:
            return Event(z)
        if self.poisson:  # add/remove-one client moves the sum by ≤ S: multiplier z
            return Event(z, "poisson", rate=m / n)
        return Event(z / 2, "without_replacement", population=n, sample=m)

    def rounds_due(self, own: State, round: int) -> int:
        """Events to account when round `round` completes: itself, plus under Poisson sampling
        the empty rounds before it that reached no aggregate."""
        if not self.poisson:
            return 1
        return round + 1 - int(own[ROUNDS]) if ROUNDS in own else 1

    def init(self, global_state: State) -> State:
        self.budget.require_noise()
        rounds = {ROUNDS: torch.zeros((), dtype=torch.int64)} if self.poisson else {}
        return {**super().init(global_state), LEDGER: Ledger().state(), NOISE: noise_state(self.budget.noise_seed, "dp-fedavg"),
                **rounds}

    def client_hooks(self, round: int, client_id: int):
        return ClipUpload(self.inner.client_hooks(round, client_id), self.clip_norm)

    def aggregate(self, global_state: State, mean_update: State, server_state: State, info: RoundInfo):
        inner_state, own = split_state(server_state)
        z = self.budget.require_noise()
        m = self.sample or len(info.clients)  # the planned m: a dropped client does not shrink it
        # Σ clip(Δ_k) over the whole upload, named as on the wire: the noise is drawn in that order
        message = with_extras(mean_update.delta, mean_update.extras)
        total = {k: t.float() * info.total_weight for k, t in message.items()}
        generator = generator_from(own, self.budget.noise_seed, "dp-fedavg")
        noisy = add_noise(total, z * self.clip_norm, generator)
        delta, extras = split_extras({k: t / m for k, t in noisy.items()})
        new_global, inner_state = self.inner.aggregate(global_state, Update(delta, extras), inner_state, info)
        ledger = Ledger(own[LEDGER]).compose(self.event(z, info.num_clients, m), self.rounds_due(own, info.round))
        rounds = {ROUNDS: torch.tensor(info.round + 1)} if ROUNDS in own else {}
        return new_global, {**inner_state, LEDGER: ledger.state(), NOISE: generator.get_state(), **rounds}

    def metrics(self, server_state: State) -> dict:
        return {**self.inner_metrics(server_state), **self.budget.report([Ledger(server_state[LEDGER])])}

    def stop_reason(self, round: int, server_state: State) -> str | None:
        if self.population is None:
            return self.inner_stop_reason(round, server_state)
        own = split_state(server_state)[1]
        ledger = Ledger(own[LEDGER]).compose(self.event(self.budget.require_noise()), self.rounds_due(own, round))
        reason = self.budget.stop_reason(round, ledger.epsilon(self.budget.delta, self.budget.method))
        return reason or self.inner_stop_reason(round, server_state)

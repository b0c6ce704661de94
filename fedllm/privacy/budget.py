"""What the privacy strategies share.

- The budget: give either `noise_multiplier` or `target_epsilon` (the noise is then chosen
  so that the planned rounds spend exactly that ε at `delta`, default 1e-5); `max_epsilon`
  (default: the target) stops the run cleanly before a round that would spend more. These
  are set in the recipe's `privacy:` section only (a strategy option of the same name is a
  recipe error that says so), which reaches the strategy as `RunInfo.privacy` in `setup(run)`.
- The noise is secret: nobody who reads the recipe can rebuild it and subtract it. The
  server's generator is seeded from `secrets` when the strategy's state is made (rank 0's
  seed, shared with every rank, since each aggregates the same mean) and its state is
  server state, so a resumed run continues the same stream: the rounds after the last
  checkpoint are redone with the noise they had, which releases nothing new when the
  rerun computes the same sums. `privacy.noise_seed` makes the noise reproducible for
  experiments — anyone who knows it can remove the noise, so a seeded run is not private.
- A client whose update is dropped (non-finite) is not in `RoundInfo.clients`: it is not
  in the sum and its ledger does not move. That is sound because its message is discarded
  unused; a deployed client should check finiteness itself and send nothing, as the
  simulation's server does on its behalf.
- The run's shape, which the engine hands every plugin before round 0 through `setup(run)`
  (`RunInfo`: planned rounds, N, clients per round and their sampler, client dataset
  sizes, local steps, examples per local step, the run seed, the privacy section).
- Wrapping: a privacy wrapper keeps its own server state under `privacy/` and passes the
  rest to the strategy it wraps; `DelegatingHooks` passes the client hooks through."""
from __future__ import annotations

import math
import secrets
from dataclasses import replace

import torch

from fedllm.privacy.accountant import Ledger, Method
from fedllm.registry import STRATEGIES, RecipeError
from fedllm.seeds import derive
from fedllm.strategies.base import ALL, MEAN, ClientHooks, DelegatingHooks, State, Strategy  # noqa: F401  (DelegatingHooks: re-exported)

PREFIX = "privacy/"
NOISE = PREFIX + "noise_rng"  # the server's noise generator state (uint8), checkpointed with the server state
BUDGET = ("noise_multiplier", "target_epsilon", "delta", "max_epsilon", "accountant")  # the privacy: keys of the Budget


def split_state(server_state: State) -> tuple[State, State]:
    """(the wrapped strategy's state, this wrapper's own entries)."""
    inner = {k: t for k, t in server_state.items() if not k.startswith(PREFIX)}
    return inner, {k: t for k, t in server_state.items() if k.startswith(PREFIX)}


def secret_seed() -> int:
    """63 bits from the OS CSPRNG. Under torch.distributed every rank draws its own; the engine
    then gives every rank rank 0's initial server state, so all add the same noise."""
    return secrets.randbits(63)


def noise_state(noise_seed: int | None, tag: str) -> torch.Tensor:
    """A fresh server noise generator's state: secret, or from `noise_seed` for experiments."""
    seed = secret_seed() if noise_seed is None else derive(noise_seed, tag=tag)
    return torch.Generator().manual_seed(seed).get_state()


def generator_from(server_state: State, noise_seed: int | None, tag: str) -> torch.Generator:
    """The server's noise generator, where the last round left it (a checkpoint from before
    the generator was server state starts a fresh one)."""
    state = server_state.get(NOISE)
    generator = torch.Generator()
    generator.set_state(noise_state(noise_seed, tag) if state is None else state.to(torch.uint8).cpu().contiguous())
    return generator


def add_noise(state: State, std: float, generator: torch.Generator) -> State:
    """state + N(0, std²) per coordinate, drawn in sorted key order (rank-independent)."""
    noisy = {}
    for k in sorted(state):
        noise = torch.randn(state[k].shape, generator=generator)  # on the CPU: the same bits on any device
        noisy[k] = state[k].float() + std * noise.to(state[k].device)
    return noisy


def flat_norm(*states: State) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for s in states for t in s.values()))


def check_privacy(options: dict, privacy: dict | None) -> dict:
    """The budget keys of the recipe's `privacy:` section (unset: None), checked; the strategy's
    `options` hold none of them."""
    budget = {k: (privacy or {}).get(k) for k in BUDGET}
    if (budget["noise_multiplier"] is None) == (budget["target_epsilon"] is None):
        raise RecipeError("set exactly one of 'privacy.noise_multiplier' and 'privacy.target_epsilon'")
    return budget


class Budget:
    """Noise multiplier, or a target ε that chooses it; the ε limit that stops a run."""

    def __init__(self, owner: str, noise_multiplier: float | None, target_epsilon: float | None, delta: float | None,
                 max_epsilon: float | None, accountant: Method | None):
        # neither is allowed here: a strategy has no budget until setup(run) brings the privacy: section
        if noise_multiplier is not None and target_epsilon is not None:
            raise ValueError(f"{owner}: set exactly one of noise_multiplier and target_epsilon")
        if noise_multiplier is not None and noise_multiplier <= 0:
            raise ValueError(f"{owner}: noise_multiplier must be > 0 (no noise is no privacy)")
        delta = 1e-5 if delta is None else delta
        if not 0 < delta < 1:
            raise ValueError(f"{owner}: delta must be in (0, 1), got {delta}")
        self.owner, self.noise_multiplier, self.target_epsilon = owner, noise_multiplier, target_epsilon
        self.delta, self.method = delta, accountant or "rdp"
        self.limit = max_epsilon if max_epsilon is not None else target_epsilon
        self.noise_seed: int | None = None  # privacy.noise_seed: reproducible, not private, noise

    @classmethod
    def of(cls, owner: str, run=None) -> "Budget":
        """The budget of a run, from `run.privacy` (setup), or none yet (construction)."""
        if run is None:
            return cls(owner, **dict.fromkeys(BUDGET))
        budget = cls(owner, **check_privacy({}, run.privacy))
        budget.noise_seed = (run.privacy or {}).get("noise_seed")
        return budget

    def require_noise(self) -> float:
        if self.noise_multiplier is None:  # setup(run) checks that the privacy: section has a budget
            raise RuntimeError(
                f"{self.owner}: no noise level before setup(run), which brings the privacy: section and the planned "
                "rounds before the first round; this engine did not call it"
            )
        return self.noise_multiplier

    def stop_reason(self, round: int, epsilon_next: float) -> str | None:
        if self.limit is not None and epsilon_next > self.limit * (1 + 1e-9):
            return (f"{self.owner}: round {round + 1} would bring ε to {epsilon_next:.4g}, past the budget "
                    f"{self.limit:g} (δ = {self.delta:g})")
        return None

    def report(self, ledgers: list[Ledger]) -> dict:
        """ε of the worst-off privacy unit, δ and the noise multiplier, for the round's metrics."""
        epsilon = max((ledger.epsilon(self.delta, self.method) for ledger in ledgers), default=0.0)
        return {"epsilon": epsilon, "delta": self.delta, "noise_multiplier": self.noise_multiplier}


class PrivacyWrapper(Strategy):
    """A strategy that wraps another one (`inner`): state, broadcast and aggregation pass
    through; subclasses add their mechanism and keep its state under `privacy/`."""

    def __init__(self, inner: dict, owner: str):
        self.inner = STRATEGIES.build(inner, f"{owner}.inner")
        # the wrapper's mechanism stands between the mean and the inner strategy: never a plain mean
        self.needs = ALL if self.inner.needs == ALL else MEAN
        self.uniform_weights, self.client_needs = self.inner.uniform_weights, self.inner.client_needs
        self.counts_in_extras = self.inner.counts_in_extras
        self.per_example_in_groups = self.inner.per_example_in_groups
        self.uses_torch_func = self.inner.uses_torch_func

    def extras_like(self, global_state: State) -> State:
        return self.inner.extras_like(global_state)

    def check_federation(self, clients_per_round: int) -> None:
        self.inner.check_federation(clients_per_round)

    def setup(self, run) -> None:
        # the wrapper consumes the privacy section; the inner strategy sees the rest
        self.inner.setup(replace(run, privacy=None))

    def init(self, global_state: State) -> State:
        return self.inner.init(global_state)

    def broadcast(self, server_state: State) -> State:
        return self.inner.broadcast(split_state(server_state)[0])

    def inner_metrics(self, server_state: State) -> dict:
        return self.inner.metrics(split_state(server_state)[0])

    def inner_stop_reason(self, round: int, server_state: State) -> str | None:
        return self.inner.stop_reason(round, split_state(server_state)[0])

"""What the privacy strategies share.

- The budget: give either `noise_multiplier` or `target_epsilon` (the noise is then chosen
  so that the planned rounds spend exactly that ε at `delta`); `max_epsilon` (default: the
  target) stops the run cleanly before a round that would spend more.
- The run's shape, which the engine hands every plugin before round 0 through `setup(run)`
  (`RunInfo`: planned rounds, N, clients per round and their sampler, client dataset
  sizes, local steps, examples per local step, the run seed).
- Wrapping: a privacy wrapper keeps its own server state under `privacy/` and passes the
  rest to the strategy it wraps; `DelegatingHooks` passes the client hooks through."""
from __future__ import annotations

import math

import numpy as np
import torch

from fedllm.privacy.accountant import Ledger, Method
from fedllm.registry import STRATEGIES
from fedllm.strategies.base import ClientHooks, State, Strategy

PREFIX = "privacy/"


def split_state(server_state: State) -> tuple[State, State]:
    """(the wrapped strategy's state, this wrapper's own entries)."""
    inner = {k: t for k, t in server_state.items() if not k.startswith(PREFIX)}
    return inner, {k: t for k, t in server_state.items() if k.startswith(PREFIX)}


def noise_generator(seed: int, round: int, salt: int) -> torch.Generator:
    # The server's noise must be identical on every rank (each aggregates the same mean)
    # and replay after a resume: seeded by (run seed, round). Like Opacus without
    # secure_mode this is for experiments — a deployment draws it from a CSPRNG.
    entropy = np.random.SeedSequence([seed, round, salt]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(entropy >> np.uint64(1)))


def add_noise(state: State, std: float, generator: torch.Generator) -> State:
    """state + N(0, std²) per coordinate, drawn in sorted key order (rank-independent)."""
    noisy = {}
    for k in sorted(state):
        noise = torch.randn(state[k].shape, generator=generator)  # on the CPU: the same bits on any device
        noisy[k] = state[k].float() + std * noise.to(state[k].device)
    return noisy


def flat_norm(*states: State) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for s in states for t in s.values()))


class Budget:
    """Noise multiplier, or a target ε that chooses it; the ε limit that stops a run."""

    def __init__(self, owner: str, noise_multiplier: float | None, target_epsilon: float | None, delta: float,
                 max_epsilon: float | None, accountant: Method):
        if (noise_multiplier is None) == (target_epsilon is None):
            raise ValueError(f"{owner}: set exactly one of noise_multiplier and target_epsilon")
        if noise_multiplier is not None and noise_multiplier <= 0:
            raise ValueError(f"{owner}: noise_multiplier must be > 0 (no noise is no privacy)")
        if not 0 < delta < 1:
            raise ValueError(f"{owner}: delta must be in (0, 1), got {delta}")
        self.owner, self.noise_multiplier, self.target_epsilon = owner, noise_multiplier, target_epsilon
        self.delta, self.method = delta, accountant
        self.limit = max_epsilon if max_epsilon is not None else target_epsilon

    def require_noise(self) -> float:
        if self.noise_multiplier is None:
            raise RuntimeError(
                f"{self.owner}: target_epsilon needs the planned rounds, which the engine passes in setup(run) "
                "before the first round; this engine did not call it"
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


class DelegatingHooks(ClientHooks):
    """Client hooks that pass every call to the wrapped strategy's hooks."""

    def __init__(self, inner: ClientHooks | None):
        self.inner = inner or ClientHooks()

    def num_steps(self, default):
        return self.inner.num_steps(default)

    def begin(self, params, ctx):
        self.inner.begin(params, ctx)

    def backward(self, inputs, loss_of, default):
        inner = getattr(self.inner, "backward", None)  # engines without the per-example hook
        return inner(inputs, loss_of, default) if inner else default()

    def before_step(self, params, regrad):
        self.inner.before_step(params, regrad)

    def finish(self, params, update):
        return self.inner.finish(params, update)


class PrivacyWrapper(Strategy):
    """A strategy that wraps another one (`inner`): state, broadcast and aggregation pass
    through; subclasses add their mechanism and keep its state under `privacy/`."""

    def __init__(self, inner: dict, owner: str):
        self.inner = STRATEGIES.build(inner, f"{owner}.inner")
        self.linear, self.uniform_weights = self.inner.linear, self.inner.uniform_weights

    def init(self, global_state: State) -> State:
        return self.inner.init(global_state)

    def broadcast(self, server_state: State) -> State:
        return self.inner.broadcast(split_state(server_state)[0])

    def inner_metrics(self, server_state: State) -> dict:
        metrics = getattr(self.inner, "metrics", None)
        return metrics(split_state(server_state)[0]) if metrics else {}

    def inner_stop_reason(self, round: int, server_state: State) -> str | None:
        stop = getattr(self.inner, "stop_reason", None)
        return stop(round, split_state(server_state)[0]) if stop else None

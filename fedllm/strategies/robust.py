"""Byzantine-robust aggregation strategies: one registered name per rule (`median`,
`trimmed_mean`, `krum`, `multi_krum`, `bulyan`, `geometric_median`, `centered_clip`), all
sharing four options:

- `f`: Byzantine clients to tolerate per round; each rule checks its requirement on the
  planned round size before any training (e.g. Krum n ≥ 2f+3) and fails with a clear
  message; a round that comes up short (Poisson sampling, rejected uploads) leaves the
  global model unchanged, with a warning.
- `nnm`: nearest-neighbour mixing before the rule (each message replaced by the mean of its
  n − f nearest) — the server form of MoNNA's NNA (Farhadkhani et al., ICML 2023) and of
  "Fixing by Mixing" (Allouah et al., AISTATS 2023).
- `momentum` β: client momentum. As in MoNNA (worker momentum, β = 0.99 in the paper's
  experiments, `momentum-at: worker` in LPD-EPFL/robust-collaborative-learning), each client
  keeps m_i ← β m_i + (1−β) Δ_i across its rounds — in the client store, server-held and
  checkpointed — and the rule aggregates the m_i, not the Δ_i. The engine always uploads Δ_i;
  m_i travels beside it as a strategy extra, and a Byzantine client's attack rewrites both.
  MoNNA = `momentum: 0.99, nnm: true` plus any rule (the paper pairs NNA with trimmed mean).
- `server_lr` η_g: x ← x + η_g · rule(…).

The server gathers every message (`needs = ALL`; across ranks by all-gather), so a round
holds all n updates at once. Messages are flattened over the adapter's tensors in sorted
key order; distances are over that whole vector. Sample counts are ignored (`uniform_weights`).
"""
from __future__ import annotations

import logging

import torch

from fedllm.registry import STRATEGIES, RecipeError
from fedllm.strategies.base import ALL, ClientHooks, RoundInfo, State, Strategy, strip_prefix, with_prefix
from fedllm.strategies.robust_rules import (
    bulyan, centered_clip, geometric_median, krum, median, multi_krum, nearest_neighbor_mixing, require, trimmed_mean,
)
from fedllm.strategies.scaffold import float_zeros, on_params, stepped

M, PREVIOUS = "m.", "previous."
log = logging.getLogger("fedllm")


class ClientMomentum(ClientHooks):
    """m_i ← β m_i + (1−β) Δ_i over the client's rounds (m_i = 0 before its first)."""

    def __init__(self, beta: float):
        self.beta = beta

    def begin(self, params, ctx):
        self.m = on_params(strip_prefix(ctx.client_state, M), params)

    @torch.no_grad()
    def finish(self, params, update):
        m = {k: self.beta * self.m[k] + (1 - self.beta) * update[k].to(self.m[k]) for k in self.m}
        return with_prefix(m, M), with_prefix(m, M)


def flatten(state: State, keys: list[str], prefix: str = "") -> torch.Tensor:
    return torch.cat([state[prefix + k].reshape(-1) for k in keys])


def unflatten(vector: torch.Tensor, like: State, keys: list[str]) -> State:
    out, offset = {}, 0
    for k in keys:
        n = like[k].numel()
        out[k] = vector[offset : offset + n].reshape(like[k].shape)
        offset += n
    return out


class Robust(Strategy):
    needs = ALL
    uniform_weights = True
    keeps_previous = False  # True: the rule starts from the previous round's aggregate

    def __init__(self, f: int, nnm: bool, momentum: float, server_lr: float):
        name = type(self).__name__
        if f < 0:
            raise ValueError(f"{name}: f must be ≥ 0, got {f}")
        if nnm and f == 0:
            raise ValueError(f"{name}: nnm with f=0 mixes all n messages into their plain mean; set f ≥ 1")
        if not 0 <= momentum < 1:
            raise ValueError(f"{name}: momentum must be in [0, 1), got {momentum}")
        if server_lr <= 0:
            raise ValueError(f"{name}: server_lr must be > 0")
        self.f, self.nnm, self.momentum, self.server_lr = f, nnm, momentum, server_lr

    def rule(self, X: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def check_federation(self, clients_per_round: int) -> None:
        # fail before any training when the planned round size cannot meet this rule's n-vs-f
        # requirement (every rule checks it on its input)
        try:
            self.rule(torch.zeros(clients_per_round, 1), torch.zeros(1))
        except ValueError as err:
            raise RecipeError(f"{err} (federation.clients_per_round={clients_per_round})") from None

    def setup(self, run) -> None:
        self.check_federation(run.clients_per_round)

    def init(self, global_state: State) -> State:
        return with_prefix(float_zeros(global_state), PREVIOUS) if self.keeps_previous else {}

    def client_hooks(self, round: int, client_id: int):
        return ClientMomentum(self.momentum) if self.momentum > 0 else None

    def extras_like(self, global_state: State) -> State:
        return with_prefix(float_zeros(global_state), M) if self.momentum > 0 else {}

    def smallest_round(self) -> int:
        """The fewest messages this rule can aggregate with its f."""
        n = 1
        while True:
            try:
                self.rule(torch.zeros(n, 1), torch.zeros(1))
                return n
            except ValueError:
                n += 1

    def aggregate(self, global_state: State, messages, server_state: State, info: RoundInfo):
        if len(messages) < (needed := self.smallest_round()):
            # a round can come up short (Poisson sampling, rejected uploads): no rule output
            # with fewer than its n-vs-f minimum, so the round changes nothing
            log.warning("round %d: %s with f=%d needs %d updates, %d arrived; the global model is unchanged",
                        info.round, type(self).__name__, self.f, needed, len(messages))
            return global_state, server_state
        keys = sorted(global_state)
        # with client momentum the rule combines the momenta the clients send, not their Δ
        X = torch.stack([flatten(m.extras, keys, M) if self.momentum > 0 else flatten(m.delta, keys, "") for _, m, _ in messages])
        if self.nnm:
            X = nearest_neighbor_mixing(X, self.f)
        previous = flatten(server_state, keys, PREVIOUS) if self.keeps_previous else None
        aggregate = unflatten(self.rule(X, previous), global_state, keys)
        if self.keeps_previous:
            server_state = with_prefix({k: t.to(server_state[PREVIOUS + k]) for k, t in aggregate.items()}, PREVIOUS)
        return stepped(global_state, aggregate, self.server_lr), server_state


@STRATEGIES.register("median")
class Median(Robust):
    """Coordinate-wise median of the client updates (n ≥ 2f+1)."""

    def __init__(self, f: int = 0, nnm: bool = False, momentum: float = 0.0, server_lr: float = 1.0):
        super().__init__(f, nnm, momentum, server_lr)

    def rule(self, X, previous):
        return median(X, self.f)


@STRATEGIES.register("trimmed_mean")
class TrimmedMean(Robust):
    """Coordinate-wise trimmed mean: drops the `trim` (default f) largest and smallest values."""

    def __init__(self, f: int = 0, trim: int | None = None, nnm: bool = False, momentum: float = 0.0, server_lr: float = 1.0):
        super().__init__(f, nnm, momentum, server_lr)
        self.trim = trim

    def rule(self, X, previous):
        return trimmed_mean(X, self.f, self.trim)


@STRATEGIES.register("krum")
class Krum(Robust):
    """Krum: the update with the least squared distance to its n−f−2 nearest (n ≥ 2f+3)."""

    def __init__(self, f: int = 0, nnm: bool = False, momentum: float = 0.0, server_lr: float = 1.0):
        super().__init__(f, nnm, momentum, server_lr)

    def rule(self, X, previous):
        return krum(X, self.f)


@STRATEGIES.register("multi_krum")
class MultiKrum(Robust):
    """Multi-Krum: mean of the m (default n−f) updates with the best Krum scores (n ≥ 2f+3)."""

    def __init__(self, f: int = 0, m: int | None = None, nnm: bool = False, momentum: float = 0.0, server_lr: float = 1.0):
        super().__init__(f, nnm, momentum, server_lr)
        self.m = m

    def rule(self, X, previous):
        return multi_krum(X, self.f, self.m)


@STRATEGIES.register("bulyan")
class Bulyan(Robust):
    """Bulyan: n−2f updates picked by repeated Krum, then a trimmed mean around their median (n ≥ 4f+3)."""

    def __init__(self, f: int = 0, nnm: bool = False, momentum: float = 0.0, server_lr: float = 1.0):
        super().__init__(f, nnm, momentum, server_lr)

    def rule(self, X, previous):
        return bulyan(X, self.f)


@STRATEGIES.register("geometric_median")
class GeometricMedian(Robust):
    """Geometric median of the updates by smoothed Weiszfeld iterations (RFA)."""

    def __init__(self, f: int = 0, nu: float = 0.1, iterations: int = 3, nnm: bool = False, momentum: float = 0.0, server_lr: float = 1.0):
        super().__init__(f, nnm, momentum, server_lr)
        if nu <= 0 or iterations < 1:
            raise ValueError("geometric_median: nu must be > 0 and iterations ≥ 1")
        self.nu, self.iterations = nu, iterations

    def rule(self, X, previous):
        require("geometric_median", X.shape[0], self.f, 2 * self.f + 1, "2f+1")  # breakdown point 1/2
        return geometric_median(X, self.nu, self.iterations)


@STRATEGIES.register("centered_clip")
class CenteredClip(Robust):
    """Centered clipping: from the previous aggregate v, `iterations` times v += mean clip_τ(x_i − v)."""

    keeps_previous = True

    def __init__(self, tau: float = 1.0, iterations: int = 3, f: int = 0, nnm: bool = False, momentum: float = 0.0, server_lr: float = 1.0):
        super().__init__(f, nnm, momentum, server_lr)
        if tau <= 0 or iterations < 1:
            raise ValueError("centered_clip: tau must be > 0 and iterations ≥ 1")
        self.tau, self.iterations = tau, iterations

    def rule(self, X, previous):
        require("centered_clip", X.shape[0], self.f, 2 * self.f + 1, "2f+1")
        return centered_clip(X, previous, self.tau, self.iterations)

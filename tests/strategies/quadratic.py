"""A plain-tensor federation for strategy tests: the heterogeneous quadratic of ALGORITHMS.md
(f_i(x) = ½(x − b_i)ᵀA_i(x − b_i), A_i diagonal), driven through the SAME Strategy and
ClientHooks objects the LLM engine uses, called the way fedllm/server.py and client.py call
them: sampler → broadcast → per client: stored state → num_steps → begin → K × (gradient,
before_step with regrad, SGD step) → finish → store → message (update + "strategy/" extras)
→ weighted mean (linear) or the sorted list (robust) → aggregate.

Everything stays in float64 (the engine rounds messages to fp32 on the wire) so exact
methods can be seen converging to ~1e-15. Gradients are deterministic, so "the same batch"
for regrad is trivially the same function.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedllm.samplers import Uniform
from fedllm.strategies.base import ClientContext, ClientHooks, RoundInfo, with_prefix


@dataclass
class Quadratic:
    A: torch.Tensor  # [N, d] diagonals
    b: torch.Tensor  # [N, d] client optima

    @classmethod
    def reference(cls, num_clients: int = 10, dim: int = 5, seed: int = 0) -> "Quadratic":
        """ALGORITHMS.md: A_i = diag(U[0.5, 4]), b_i ~ N(0, 9), numpy default_rng(0)."""
        rng = np.random.default_rng(seed)
        A = rng.uniform(0.5, 4.0, size=(num_clients, dim))
        b = rng.normal(0.0, 3.0, size=(num_clients, dim))
        return cls(torch.tensor(A), torch.tensor(b))

    def __post_init__(self):
        self.rows = list(zip(self.A.unbind(0), self.b.unbind(0)))  # per-client views, made once

    @property
    def num_clients(self) -> int:
        return self.A.shape[0]

    @property
    def optimum(self) -> torch.Tensor:
        # ∇ Σ_i f_i = Σ_i A_i (x − b_i) = 0
        return (self.A * self.b).sum(0) / self.A.sum(0)

    def grad(self, i: int, x: torch.Tensor) -> torch.Tensor:
        a, b = self.rows[i]
        return a * (x.detach() - b)


def run_client(strategy, problem: Quadratic, round: int, i: int, x_t: dict, broadcast: dict, store: dict, lr: float, steps: int):
    """One local round, as fedllm.server.run_client + fedllm.client.local_round do it."""
    params = {"x": torch.nn.Parameter(x_t["x"].clone())}
    hooks = strategy.client_hooks(round, i) or ClientHooks()
    k_steps = hooks.num_steps(steps)

    def gradient(limit=None):
        return {"x": problem.grad(i, params["x"])}

    def regrad():
        params["x"].grad = problem.grad(i, params["x"])

    hooks.begin(params, ClientContext(round, i, x_t, broadcast, store.get(i, {}), lr, k_steps, gradient))
    for _ in range(k_steps):
        params["x"].grad = problem.grad(i, params["x"])
        hooks.before_step(params, regrad)
        with torch.no_grad():
            params["x"] -= lr * params["x"].grad  # plain SGD, no clipping
    update = {"x": params["x"].detach() - x_t["x"]}
    extras, client_state = hooks.finish(params, update)
    if client_state:
        store[i] = {k: t.clone() for k, t in client_state.items()}
    return {**update, **with_prefix(extras)}


def weighted_mean(kept: list) -> dict:
    total = sum(w for _, _, w in kept)
    keys = kept[0][1].keys()
    return {k: sum(w * m[k] for _, m, w in kept) / total for k in keys}


@dataclass
class Run:
    x: torch.Tensor
    server_state: dict
    store: dict
    history: list  # ‖x − x*‖ after every round

    def error(self, problem: Quadratic) -> float:
        return float(torch.linalg.vector_norm(self.x - problem.optimum))


def simulate(strategy, problem: Quadratic, rounds: int, lr: float, steps: int, clients_per_round: int | None = None,
             seed: int = 0, attack=None, byzantine: frozenset = frozenset(), start: Run | None = None) -> Run:
    """Runs `rounds` rounds (continuing `start` if given) and returns the final state."""
    n = problem.num_clients
    x = {"x": start.x.clone()} if start else {"x": torch.zeros(problem.A.shape[1], dtype=torch.float64)}
    server_state = dict(start.server_state) if start else strategy.init(x)
    store = dict(start.store) if start else {}
    history = list(start.history) if start else []
    for t in range(len(history), len(history) + rounds):
        sampled = Uniform().sample(t, n, clients_per_round or n, seed)
        broadcast = {k: v.clone() for k, v in strategy.broadcast(server_state).items()}
        sent = {k: v.clone() for k, v in broadcast.items()}
        kept = []
        for i in sampled:  # like the engine, every client of the round sees the same dict
            message = run_client(strategy, problem, t, i, x, broadcast, store, lr, steps)
            kept.append((i, message, 1.0))  # equal sample counts: uniform and sample weights agree
        assert all(torch.equal(broadcast[k], sent[k]) for k in sent), "a client hook wrote into the broadcast"
        if attack is not None:
            kept = attack.poison_updates(kept, set(byzantine), t)
        updates = kept if not strategy.linear else weighted_mean(kept)
        info = RoundInfo(t, sampled, float(len(kept)), n, lr=lr, local_steps=steps)
        x, server_state = strategy.aggregate(x, updates, server_state, info)
        history.append(float(torch.linalg.vector_norm(x["x"] - problem.optimum)))
    return Run(x["x"], server_state, store, history)


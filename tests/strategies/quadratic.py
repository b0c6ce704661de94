"""A plain-tensor federation for strategy tests: the heterogeneous quadratic of ALGORITHMS.md
(f_i(x) = ½(x − b_i)ᵀA_i(x − b_i), A_i diagonal), driven through the SAME Strategy objects
and the SAME `fedllm.client.Client` (the only driver of ClientHooks) and `fedllm.channel.Channel`
the LLM engine uses; only the local loop is the quadratic's: K × (gradient, the driver's
step: hooks' before_step with regrad, plain SGD). Then the weighted mean (needs "mean") or
the sorted list (needs "all") → aggregate.

Everything stays in float64 (safetensors carries F64 exactly; the LLM engine's updates are
fp32) so exact methods can be seen converging to ~1e-15. Gradients are deterministic, so
"the same batch" for regrad is trivially the same function.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

from fedllm.adapters.base import Adapter
from fedllm.channel import Channel
from fedllm.client import Client
from fedllm.samplers import Uniform
from fedllm.state import ClientRecord
from fedllm.strategies.base import ALL, RoundInfo, Update
from fedllm.training import FULL_GRADIENT, REGRAD, VARIABLE_STEPS, LocalJob, LocalLoop, LocalResult, StepDriver
from fedllm.wire import WireContext


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


class QuadraticLoop(LocalLoop):
    """Plain SGD on client i's quadratic, no clipping; Δ stays float64."""

    name = "the quadratic loop"
    supports = frozenset({REGRAD, FULL_GRADIENT, VARIABLE_STEPS})

    def __init__(self, problem: "Quadratic"):
        self.problem = problem

    def gradient(self, job: LocalJob) -> torch.Tensor:
        return self.problem.grad(job.client_id, job.params["x"])

    def train(self, job: LocalJob, driver: StepDriver) -> LocalResult:
        x = job.params["x"]

        def regrad():
            x.grad = self.gradient(job)

        def sgd_step():
            with torch.no_grad():
                x.sub_(job.lr * x.grad)

        for _ in range(job.steps):
            x.grad = self.gradient(job)
            driver.step(sgd_step, lambda: None, regrad)
        return LocalResult({"x": x.detach() - job.x_t["x"]}, 1, float("nan"), job.steps, None)

    def full_gradient(self, job: LocalJob, limit=None) -> dict:
        return {"x": self.gradient(job)}


def quadratic_client(strategy, problem: "Quadratic", steps: int) -> Client:
    """The engine's Client on a one-tensor 'model' holding x."""
    model = torch.nn.Module()
    model.x = torch.nn.Parameter(torch.zeros(problem.A.shape[1], dtype=torch.float64))
    cfg = SimpleNamespace(max_steps=steps, gradient_accumulation_steps=1, per_device_train_batch_size=1,
                          num_train_epochs=None, max_grad_norm=None, keep_optimizer_state=False)
    data = [[{}]] * problem.num_clients  # one "example" each: every client weighs 1
    return Client(model, {"x": model.x}, Adapter(), strategy, QuadraticLoop(problem), cfg, data, 0,
                  torch.device("cpu"), seed=0)


def run_client(client: Client, channel: Channel, round: int, i: int, x_t: dict, broadcast: dict, store: dict,
               lr: float) -> Update:
    """One local round through the real Client and Channel; returns the decoded upload."""
    upload = client.run(i, round, x_t, broadcast, ClientRecord(strategy=store.get(i, {})), lr)
    if upload.record.strategy:
        store[i] = {k: t.clone() for k, t in upload.record.strategy.items()}
    message, _ = channel.up(upload.update, upload.extras, WireContext(round, i, 0), {})
    return message


def weighted_mean(kept: list) -> Update:
    total = sum(w for _, _, w in kept)

    def mean(part: str) -> dict:
        keys = getattr(kept[0][1], part).keys()
        return {k: sum(w * getattr(m, part)[k] for _, m, w in kept) / total for k in keys}

    return Update(mean("delta"), mean("extras"))


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
    client, channel = quadratic_client(strategy, problem, steps), Channel(Adapter(), [])
    for t in range(len(history), len(history) + rounds):
        sampled = Uniform().sample(t, n, clients_per_round or n, seed)
        broadcast = {k: v.clone() for k, v in strategy.broadcast(server_state).items()}
        sent = {k: v.clone() for k, v in broadcast.items()}
        kept = []
        for i in sampled:  # like the engine, every client of the round sees the same dict
            message = run_client(client, channel, t, i, x, broadcast, store, lr)
            kept.append((i, message, 1.0))  # equal sample counts: uniform and sample weights agree
        assert all(torch.equal(broadcast[k], sent[k]) for k in sent), "a client hook wrote into the broadcast"
        if attack is not None:
            kept = attack.poison_updates(kept, set(byzantine), t)
        updates = kept if strategy.needs == ALL else weighted_mean(kept)
        info = RoundInfo(t, sampled, float(len(kept)), n, lr=lr, local_steps=steps)
        x, server_state = strategy.aggregate(x, updates, server_state, info)
        history.append(float(torch.linalg.vector_norm(x["x"] - problem.optimum)))
    return Run(x["x"], server_state, store, history)


"""The noise-robust ADMM's reference setting (Lari et al., arXiv 2409.13451): federated
weighted least squares, f_i(w) = ½‖y_i − X_i w‖²_{W_i}/n_i, driven through the real Client
(inexact local SGD: K gradient steps per iteration) and the real Channel with the
noisy_link codec — independent Gaussian noise of one fixed σ on every client's download
and upload, the same for both algorithms."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedllm.adapters.base import Adapter
from fedllm.channel import Channel
from fedllm.client import Client
from fedllm.codecs.noisy_link import NoisyLink
from fedllm.registry import STRATEGIES
from fedllm.samplers import Uniform
from fedllm.state import ClientRecord
from fedllm.strategies.base import RoundInfo, RunInfo
from fedllm.wire import MalformedMessage, WireContext

from .quadratic import QuadraticLoop


class WLS:
    """N clients with n_i samples y = X w_true + noise, sample weights W_i ~ U[0.5, 1.5]."""

    def __init__(self, num_clients: int = 10, dim: int = 5, samples: int = 20, seed: int = 0):
        rng = np.random.default_rng(seed)
        w_true = rng.normal(size=dim)
        self.R, self.p = [], []
        for _ in range(num_clients):
            X = rng.normal(size=(samples, dim)) * rng.uniform(0.5, 2.0)  # heterogeneous client scales
            W = rng.uniform(0.5, 1.5, size=samples)
            y = X @ w_true + 0.1 * rng.normal(size=samples)
            self.R.append(torch.tensor(X.T @ (W[:, None] * X) / samples))
            self.p.append(torch.tensor(X.T @ (W * y) / samples))
        self.num_clients, self.dim = num_clients, dim
        self.optimum = torch.linalg.solve(sum(self.R), sum(self.p))  # w* = (Σ R_i)⁻¹ Σ p_i

    def grad(self, i: int, w: torch.Tensor) -> torch.Tensor:
        return self.R[i] @ w.detach() - self.p[i]


def run(name: str, problem: WLS, iterations: int, sigma: float = 0.0, per_round: int | None = None, rho: float = 1.0,
        steps: int = 10, lr: float = 0.2, **options) -> list[float]:
    """‖z − w*‖² after every iteration."""
    n = problem.num_clients
    strategy = STRATEGIES.build({"name": name, "rho": rho, **options})
    strategy.setup(RunInfo(iterations, n, per_round or n, "uniform", [1] * n, [steps] * n, 1, 0))
    model = torch.nn.Module()
    model.x = torch.nn.Parameter(torch.zeros(problem.dim, dtype=torch.float64))
    cfg = SimpleNamespace(max_steps=steps, gradient_accumulation_steps=1, per_device_train_batch_size=1,
                          num_train_epochs=None, max_grad_norm=None, keep_optimizer_state=False)
    client = Client(model, {"x": model.x}, Adapter(), strategy, QuadraticLoop(problem), cfg, [[{}]] * n, 0,
                    torch.device("cpu"), seed=0)
    codecs = [NoisyLink(snr_db=None, noise_std=sigma, downlink=True)] if sigma else []
    channel = Channel(Adapter(), codecs)
    z = {"x": torch.zeros(problem.dim, dtype=torch.float64)}
    server_state, store, errors = strategy.init(z), {}, []
    for t in range(iterations):
        broadcast = strategy.broadcast(server_state)
        kept = []
        for i in Uniform().sample(t, n, per_round or n, 0):
            down = channel.down(z, broadcast, torch.device("cpu"), WireContext(t, i, 0))  # i's own noisy copy
            upload = client.run(i, t, down.x_t, down.broadcast, ClientRecord(strategy=store.get(i, {})), lr)
            try:
                message, _ = channel.up(upload.update, upload.extras, WireContext(t, i, 0), {})
            except MalformedMessage:
                continue
            store[i] = upload.record.strategy
            kept.append((i, message, 1.0))
        z, server_state = strategy.aggregate(z, kept, server_state, RoundInfo(t, [i for i, _, _ in kept], len(kept), n))
        errors.append(float((z["x"] - problem.optimum).square().sum()))
    return errors


@pytest.mark.parametrize("name", ["noise_robust_admm", "admm"])
def test_noiseless_links_converge_to_the_wls_solution(name):
    errors = run(name, WLS(), 80)
    assert errors[0] > 0.01 and errors[-1] < 1e-12  # down to float64 rounding


def test_partial_participation_with_idle_updates_still_converges_exactly():
    # 3 of 10 clients per iteration; the unscheduled ones keep iterating when next seen
    errors = run("noise_robust_admm", WLS(), 120, per_round=3)
    assert errors[-1] < 1e-12


def test_a_client_back_after_missing_rounds_owes_those_idle_iterations_up_to_the_cap():
    strategy = STRATEGIES.build({"name": "noise_robust_admm", "max_idle_iterations": 3})
    state = strategy.init({"x": torch.zeros(2)})
    state["last_round"] = torch.tensor([-1.0, 4.0, 1.0, 5.0], dtype=torch.float64)
    strategy.broadcast(state)
    assert [strategy.client_hooks(6, i).num_steps(10) for i in range(5)] == [10, 20, 40, 10, 10]  # 4: never seen
    off = STRATEGIES.build({"name": "noise_robust_admm", "idle_updates": False})
    off.broadcast(state)
    assert off.client_hooks(6, 2).num_steps(10) == 10


@pytest.mark.slow
def test_under_link_noise_the_robust_form_stays_at_the_noise_floor_and_standard_admm_drifts():
    problem, sigma = WLS(), 0.02
    robust = run("noise_robust_admm", problem, 200, sigma=sigma)
    standard = run("admm", problem, 200, sigma=sigma)
    floor_robust, floor_standard = np.mean(robust[100:]), np.mean(standard[100:])
    print(f"steady-state ‖z − w*‖², σ={sigma}: noise_robust_admm {floor_robust:.3g}, admm {floor_standard:.3g}")
    assert floor_robust < 0.2 * floor_standard

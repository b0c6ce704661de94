"""Poisson client sampling: the sampler's statistics, and dp_fedavg's Poisson-subsampled
Gaussian accounting checked against dp-accounting's own composition."""
import dp_accounting
import numpy as np
import pytest
import torch

from fedllm.registry import SAMPLERS, STRATEGIES
from fedllm.samplers import Participation
from fedllm.strategies.base import RoundInfo, Update


def test_each_client_joins_with_probability_q_and_rounds_replay():
    sampler = SAMPLERS.build({"name": "poisson"}, "federation.sampler")
    rounds = [sampler.sample(t, 50, 5, seed=7) for t in range(1000)]  # q = 0.1
    sizes = np.array([len(r) for r in rounds])
    assert sizes.mean() == pytest.approx(5.0, abs=0.25)  # q·N; sd of the mean ≈ 0.07
    assert sizes.var() == pytest.approx(50 * 0.1 * 0.9, rel=0.1)  # binomial, not a fixed k
    assert (sizes == 0).any()  # (0.9)^50 ≈ 0.5%: empty rounds happen
    joins = np.bincount(np.concatenate([r for r in rounds if r]), minlength=50) / 1000
    assert joins.min() > 0.06 and joins.max() < 0.14  # every client near q (sd ≈ 0.0095)
    assert all(r == sorted(set(r)) for r in rounds)
    assert sampler.sample(3, 50, 5, seed=7) == rounds[3]  # a pure function of (seed, round)
    assert sampler.sample(3, 50, 5, seed=8) != rounds[3]
    assert Participation(sampler, 50, 5, 7).sampled(11) == rounds[11]


def library_epsilon(accountant, q, z, rounds, delta=1e-5):
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("method", ["rdp", "pld"])
def test_dp_fedavg_with_poisson_sampling_spends_what_dp_accounting_computes(run_info, method):
    s = STRATEGIES.build({"name": "dp_fedavg"})
    s.setup(run_info(rounds=30, num_clients=100, clients_per_round=10, sampler="poisson",
                     privacy={"noise_multiplier": 0.8, "accountant": method}))
    x = {"w": torch.zeros(3)}
    state = s.init(x)
    for t in range(30):
        _, state = s.aggregate(x, Update(x), state, RoundInfo(t, [t % 100], 1.0, 100))
    fresh = (dp_accounting.rdp.RdpAccountant() if method == "rdp"
             else dp_accounting.pld.PLDAccountant(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE))
    assert s.metrics(state)["epsilon"] == pytest.approx(library_epsilon(fresh, 0.1, 0.8, 30), rel=1e-3)


def test_an_empty_poisson_round_is_still_accounted(run_info):
    def spent(rounds_run):
        s = STRATEGIES.build({"name": "dp_fedavg"})
        s.setup(run_info(rounds=5, num_clients=20, clients_per_round=4, sampler="poisson", privacy={"noise_multiplier": 1.0}))
        x = {"w": torch.zeros(3)}
        state = s.init(x)
        for t in rounds_run:  # the engine skips aggregate in a round that sampled nobody
            _, state = s.aggregate(x, Update(x), state, RoundInfo(t, [0], 1.0, 20))
        return s, state

    s, skipped = spent([0, 2])  # round 1 was empty
    _, full = spent([0, 1, 2])
    assert s.metrics(skipped)["epsilon"] == pytest.approx(s.metrics(full)["epsilon"], rel=1e-9)
    s, state = spent([0])  # rounds 1 and 2 empty: the budget check before round 3 counts them
    _, four = spent([0, 1, 2, 3])
    s.budget.limit = s.metrics(four)["epsilon"] * (1 - 1e-6)
    assert "past the budget" in s.stop_reason(3, state)


def test_poisson_target_epsilon_is_spent_over_the_planned_rounds(run_info):
    s = STRATEGIES.build({"name": "dp_fedavg"})
    s.setup(run_info(rounds=20, num_clients=50, clients_per_round=5, sampler="poisson", privacy={"target_epsilon": 2.0}))
    x = {"w": torch.zeros(3)}
    state = s.init(x)
    for t in range(20):
        assert s.stop_reason(t, state) is None
        _, state = s.aggregate(x, Update(x), state, RoundInfo(t, [0], 1.0, 50))
    assert s.metrics(state)["epsilon"] == pytest.approx(2.0, rel=1e-3) and s.metrics(state)["epsilon"] <= 2.0

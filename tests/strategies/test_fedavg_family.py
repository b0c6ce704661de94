import torch

from fedllm.collectors import WeightedSum
from fedllm.registry import STRATEGIES
from fedllm.strategies.base import ClientContext, RoundInfo, Update

INFO = RoundInfo(round=0, clients=[0, 1], total_weight=4.0, num_clients=2)


def test_fedavg_applies_the_sample_weighted_mean_of_updates():
    x = {"w": torch.tensor([1.0, 2.0])}
    updates = [({"w": torch.tensor([1.0, 0.0])}, 1), ({"w": torch.tensor([0.0, 4.0])}, 3)]
    total = WeightedSum(x)
    for u, n in updates:
        total.add(u, n)
    new, _ = STRATEGIES.build({"name": "fedavg"}).aggregate(x, Update(total.mean()), {}, INFO)
    assert torch.allclose(new["w"], torch.tensor([1.25, 5.0]))


def test_fedavgm_accumulates_server_momentum():
    s = STRATEGIES.build({"name": "fedavgm", "server_lr": 0.5, "momentum": 0.9})
    x = {"w": torch.zeros(1)}
    state = s.init(x)
    d = Update({"w": torch.ones(1)})
    x, state = s.aggregate(x, d, state, INFO)  # v = -1, x = 0.5
    x, state = s.aggregate(x, d, state, INFO)  # v = -1.9, x = 0.5 + 0.95
    assert torch.allclose(x["w"], torch.tensor([1.45]))
    assert torch.allclose(state["v.w"], torch.tensor([-1.9]))


def test_fedprox_hook_adds_mu_times_distance_to_the_global_point():
    hooks = STRATEGIES.build({"name": "fedprox", "mu": 0.5}).client_hooks(0, 0)
    p = torch.nn.Parameter(torch.tensor([3.0, -1.0]))
    p.grad = torch.tensor([0.1, 0.1])
    ctx = ClientContext(0, 0, {"w": torch.tensor([1.0, 1.0])}, {}, {}, lr=0.1, steps=1)
    hooks.begin({"w": p}, ctx)
    hooks.before_step({"w": p}, regrad=None)
    assert torch.allclose(p.grad, torch.tensor([0.1 + 0.5 * 2.0, 0.1 + 0.5 * -2.0]))

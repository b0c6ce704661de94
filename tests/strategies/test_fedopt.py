import math

import pytest
import torch

from fedllm.registry import STRATEGIES
from fedllm.strategies.base import RoundInfo, Update

INFO = RoundInfo(round=0, clients=[0], total_weight=1.0, num_clients=1)


def by_hand(name, deltas, eta=0.1, b1=0.9, b2=0.99, tau=1e-3):
    """Reddi et al. 2021, Alg. 2, scalar by scalar."""
    x, m, v = 0.5, 0.0, tau**2
    for d in deltas:
        m = b1 * m + (1 - b1) * d
        if name == "fedadagrad":
            v = v + d * d
        elif name == "fedadam":
            v = b2 * v + (1 - b2) * d * d
        else:
            v = v - (1 - b2) * d * d * math.copysign(1.0, v - d * d)
        x = x + eta * m / (math.sqrt(v) + tau)
    return x


@pytest.mark.parametrize("name", ["fedadagrad", "fedadam", "fedyogi"])
def test_fedopt_matches_a_hand_computed_step(name):
    options = {"name": name, "server_lr": 0.1, "beta1": 0.9, "tau": 1e-3}
    if name != "fedadagrad":
        options["beta2"] = 0.99
    s = STRATEGIES.build(options)
    x = {"w": torch.tensor([0.5], dtype=torch.float64)}
    state = s.init(x)
    deltas = [0.2, -0.05, 0.3]
    for d in deltas:
        x, state = s.aggregate(x, Update({"w": torch.tensor([d])}), state, INFO)
    assert x["w"].item() == pytest.approx(by_hand(name, deltas), rel=1e-5)


def test_fedadam_first_step_moves_about_server_lr_in_the_update_direction():
    s = STRATEGIES.build({"name": "fedadam", "server_lr": 0.01})
    x = {"w": torch.zeros(3)}
    x, _ = s.aggregate(x, Update({"w": torch.tensor([1.0, -2.0, 0.0])}), s.init(x), INFO)
    # m = 0.1Δ, v ≈ 0.01Δ² → step ≈ η·sign(Δ)
    assert torch.allclose(x["w"], torch.tensor([0.01, -0.01, 0.0]), atol=2e-4)

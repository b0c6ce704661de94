"""DP-BREM: schedules, client momentum, centered clipping with noise, and its accounting."""
import pytest
import torch

from fedllm.privacy.accountant import Event
from fedllm.registry import STRATEGIES
from fedllm.strategies.base import ClientContext, RoundInfo, Update


def build(run_info, privacy, rounds=10, **options):
    s = STRATEGIES.build({"name": "dp_brem", **options})
    s.setup(run_info(rounds=rounds, num_clients=3, client_sizes=[64, 32, 128], batch_size=8, privacy=privacy))
    return s


def test_clips_and_lr_shrink_linearly_as_the_official_code(run_info):
    s = build(run_info, {"noise_multiplier": 1.0}, record_clip=10.0, client_clip=5.0, server_lr=0.1)
    assert s.clips(0) == (10.0, 5.0) and s.clips(10) == pytest.approx((3.0, 1.5))
    assert s.clips(5) == pytest.approx((6.5, 3.25)) and s.lr(10) == pytest.approx(0.01)


def test_the_client_sends_its_momentum_of_clipped_gradients(run_info):
    s = build(run_info, {"noise_multiplier": 1.0}, momentum=0.5, record_clip=1e9)
    params = {"w": torch.nn.Parameter(torch.tensor([1.0, -2.0]))}
    hooks = s.client_hooks(0, 1)
    assert hooks.num_steps(10) == 1
    previous = {"momentum.w": torch.tensor([4.0, 4.0])}
    hooks.begin(params, ClientContext(0, 1, {"w": params["w"].detach().clone()}, {}, previous, 0.1, 1))
    batch = {"x": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "y": torch.tensor([0.0, 0.0])}
    hooks.backward(batch, lambda b: ((b["x"] @ params["w"] - b["y"]) ** 2).mean(), default=None)
    hooks.before_step(params, regrad=None)
    assert params["w"].grad is None  # the client does not move the model
    update = {"w": torch.zeros(2)}
    _, stored = hooks.finish(params, update)
    gradient = torch.tensor([2.0 * 1.0, 2.0 * -2.0]) / 2  # mean of per-example ∇(x·w)²
    torch.testing.assert_close(update["w"], 0.5 * gradient + 0.5 * previous["momentum.w"])
    assert torch.equal(stored["momentum.w"], update["w"])


def test_the_server_clips_around_the_global_momentum_then_steps(run_info):
    s = build(run_info, {"noise_multiplier": 1e-9}, client_clip=1.0, server_lr=0.5, final_clip_ratio=1.0, final_lr_ratio=1.0)
    x = {"w": torch.tensor([0.0, 0.0])}
    state = s.init(x)
    state["momentum.w"] = torch.tensor([1.0, 0.0])
    kept = [(0, Update({"w": torch.tensor([1.0, 3.0])}), 1.0), (2, Update({"w": torch.tensor([1.5, 0.0])}), 1.0)]
    new, state = s.aggregate(x, kept, state, RoundInfo(0, [0, 2], 2.0, 3))
    # u_0 = clip((0, 3), 1) = (0, 1); u_2 = (0.5, 0) already inside: M = (1, 0) + (0.5, 1)/2
    torch.testing.assert_close(state["momentum.w"], torch.tensor([1.25, 0.5]))
    torch.testing.assert_close(new["w"], -0.5 * torch.tensor([1.25, 0.5]))


def test_accounting_without_momentum_is_the_subsampled_gaussian(run_info):
    s = build(run_info, {"noise_multiplier": 0.1}, momentum=0.0)
    event, _ = s.event(0, 0, 0.0, 0.1)
    assert event == Event(0.1 * 8, "poisson", rate=8 / 64)  # z = σR/(R/b) = σb


def test_accounting_with_momentum_follows_the_records_influence(run_info):
    s = build(run_info, {"noise_multiplier": 0.1}, momentum=0.9, final_clip_ratio=1.0, record_clip=2.0)
    s1 = 0.1 * 2.0 / 8  # (1 − β)·R/b after one round
    event, sensitivity = s.event(0, 0, 0.0, 0.1)
    assert sensitivity == pytest.approx(s1) and event.noise == pytest.approx(0.1 * 2.0 / s1)
    event, sensitivity = s.event(0, 1, s1, 0.1)
    assert sensitivity == pytest.approx(s1 + 0.9 * s1)  # the record still sits in the momentum
    x = {"w": torch.zeros(2)}
    state = s.init(x)
    _, state = s.aggregate(x, [(1, Update({"w": torch.zeros(2)}), 1.0)], state, RoundInfo(0, [1], 1.0, 3))
    assert float(state["privacy/sensitivity"][1]) == pytest.approx(s1) and s.metrics(state)["epsilon"] > 0


def test_target_epsilon_is_met_by_the_planned_rounds(run_info):
    s = build(run_info, {"target_epsilon": 4.0}, rounds=6)
    x = {"w": torch.zeros(2)}
    state = s.init(x)
    for t in range(6):
        assert s.stop_reason(t, state) is None
        _, state = s.aggregate(x, [(c, Update({"w": torch.zeros(2)}), 1.0) for c in range(3)], state, RoundInfo(t, [0, 1, 2], 3.0, 3))
    assert s.metrics(state)["epsilon"] == pytest.approx(4.0, rel=1e-3)
    assert s.stop_reason(6, state) is not None

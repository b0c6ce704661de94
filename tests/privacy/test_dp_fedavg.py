"""DP-FedAvg: clipped uploads, noise of the stated size, ε every round, a budget that stops
the run, and a ledger that resumes."""
import pytest
import torch
from safetensors.torch import load, save

from fedllm.registry import STRATEGIES, RecipeError
from fedllm.strategies.base import ClientContext, ClientHooks, RoundInfo, Strategy, Update


@STRATEGIES.register("test_gathering_inner")
class Gathering(Strategy):
    """Test strategy: wants every message (like a robust rule)."""

    needs = "all"


def build(**options):
    return STRATEGIES.build({"name": "dp_fedavg", **options})


def upload(strategy, update, extras=None):
    """The client side: the strategy's hooks see the update (and any extras) and clip them."""

    class Extras(ClientHooks):
        def finish(self, params, update):
            return dict(extras or {}), None

    strategy.inner.client_hooks = lambda round, client: Extras()
    hooks = strategy.client_hooks(0, 0)
    params = {k: torch.nn.Parameter(torch.zeros_like(t)) for k, t in update.items()}
    hooks.begin(params, ClientContext(0, 0, {k: torch.zeros_like(t) for k, t in update.items()}, {}, {}, 0.1, 1))
    sent_extras, _ = hooks.finish(params, update)
    return update, sent_extras


def test_every_upload_is_clipped_to_the_clip_norm_jointly_with_its_extras():
    s = build(clip_norm=2.0)
    gen = torch.Generator().manual_seed(0)
    for scale in (0.1, 1.0, 10.0, 1000.0):
        update = {"a": scale * torch.randn(30, generator=gen), "b": scale * torch.randn(4, 5, generator=gen)}
        before = {k: t.clone() for k, t in update.items()}
        update, extras = upload(s, update, {"c": scale * torch.randn(7, generator=gen)})
        norm = torch.cat([t.reshape(-1) for t in (*update.values(), *extras.values())]).norm()
        assert norm <= 2.0 * (1 + 1e-6)
        if scale == 0.1:  # small uploads go through untouched
            assert all(torch.equal(update[k], before[k]) for k in update)


def test_zero_updates_get_noise_of_std_z_s_over_m(run_info):
    s = build(clip_norm=0.5)
    s.setup(run_info(num_clients=10, clients_per_round=4, privacy={"noise_multiplier": 1.3}))
    zeros = {"w": torch.zeros(200_000)}
    new, _ = s.aggregate(zeros, Update(zeros), s.init(zeros), RoundInfo(0, [1, 3, 5, 7], 4.0, 10))
    assert new["w"].mean().abs() < 1e-3
    assert new["w"].std().item() == pytest.approx(1.3 * 0.5 / 4, rel=0.01)


def test_the_mean_is_over_the_planned_m_and_the_same_on_every_call(run_info):
    s = build(clip_norm=1.0)
    s.setup(run_info(num_clients=4, clients_per_round=4, privacy={"noise_multiplier": 1e-6}))
    x = {"w": torch.zeros(3)}
    mean_of_three = Update({"w": torch.tensor([0.3, 0.0, -0.3])})  # one of four clients was dropped
    info = RoundInfo(0, [0, 1, 2], 3.0, 4)
    state = s.init(x)
    new, _ = s.aggregate(x, mean_of_three, state, info)
    torch.testing.assert_close(new["w"], torch.tensor([0.225, 0.0, -0.225]), atol=1e-5, rtol=0)
    again, _ = s.aggregate(x, mean_of_three, state, info)
    assert torch.equal(new["w"], again["w"])  # the noise stream is server state: every rank adds the same noise


def test_epsilon_is_reported_every_round_and_matches_the_event(run_info):
    s = build()
    s.setup(run_info(num_clients=5, privacy={"noise_multiplier": 1.0}))
    x, state = {"w": torch.zeros(2)}, None
    state = s.init(x)
    _, state = s.aggregate(x, Update(x), state, RoundInfo(0, list(range(5)), 5.0, 5))
    assert s.metrics(state)["epsilon"] == pytest.approx(4.7285, abs=1e-4)  # all clients: Gaussian, z = 1
    partial = build()
    partial.setup(run_info(num_clients=100, clients_per_round=10, privacy={"noise_multiplier": 1.0}))
    assert partial.event(1.0).kind == "without_replacement" and partial.event(1.0).noise == 0.5  # sum moves ≤ 2S


def test_target_epsilon_sets_the_noise_and_the_budget_stops_the_run(run_info):
    s = build()
    s.setup(run_info(rounds=5, num_clients=3, privacy={"target_epsilon": 3.0}))
    x = {"w": torch.zeros(2)}
    state, spent = s.init(x), []
    for t in range(7):
        if s.stop_reason(t, state):
            break
        _, state = s.aggregate(x, Update(x), state, RoundInfo(t, [0, 1, 2], 3.0, 3))
        spent.append(s.metrics(state)["epsilon"])
    assert len(spent) == 5 and spent[-1] == pytest.approx(3.0, rel=1e-3) and spent[-1] <= 3.0
    assert "past the budget 3" in s.stop_reason(5, state)


def test_a_resumed_ledger_continues_epsilon(run_info):
    def fresh():
        s = build()
        s.setup(run_info(num_clients=3, privacy={"noise_multiplier": 2.0}))
        return s

    x = {"w": torch.zeros(2)}
    s, state, straight = fresh(), None, []
    state = s.init(x)
    for t in range(4):
        _, state = s.aggregate(x, Update(x), state, RoundInfo(t, [0, 1, 2], 3.0, 3))
        straight.append(s.metrics(state)["epsilon"])
        if t == 1:
            checkpoint = save(state)
    s, state = fresh(), load(checkpoint)
    for t in (2, 3):
        _, state = s.aggregate(x, Update(x), state, RoundInfo(t, [0, 1, 2], 3.0, 3))
    assert s.metrics(state)["epsilon"] == pytest.approx(straight[-1], rel=1e-12)


def test_options_are_checked(run_info):
    for privacy in ({"noise_multiplier": 1.0, "target_epsilon": 1.0}, None):  # both, or no budget
        with pytest.raises(RecipeError, match="exactly one of 'privacy.noise_multiplier' and 'privacy.target_epsilon'"):
            build().setup(run_info(privacy=privacy))
    with pytest.raises(ValueError, match="must be linear"):
        build(inner={"name": "test_gathering_inner"})
    with pytest.raises(RuntimeError, match="setup"):
        build().init({"w": torch.zeros(1)})

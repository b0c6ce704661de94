"""Each half of SCAFFOLD, FedSpeed, FedAvg-M/SCAFFOLD-M and FedAMD, step by step against
hand-computed numbers."""
import pytest
import torch

from fedllm.registry import STRATEGIES
from fedllm.strategies.base import ClientContext, RoundInfo
from fedllm.strategies.fedamd import is_anchor
from fedllm.strategies.base import Update

A, B = torch.tensor([1.0, 3.0]), torch.tensor([2.0, -1.0])


def grad(w):  # ∇ of ½ Σ A (w − B)²
    return A * (w.detach() - B)


def client(spec, w, broadcast=None, stored=None, x_t=None, lr=0.1, steps=4, round=0, client_id=0):
    strategy = STRATEGIES.build(spec)
    hooks = strategy.client_hooks(round, client_id)
    params = {"w": torch.nn.Parameter(w.clone())}
    x_t = {"w": w.clone()} if x_t is None else x_t
    gradient = lambda limit=None: {"w": grad(params["w"])}  # noqa: E731
    hooks.begin(params, ClientContext(round, client_id, x_t, broadcast or {}, stored or {}, lr, steps, gradient))
    return hooks, params


def info(clients, n, lr=0.1, steps=4):
    return RoundInfo(0, clients, float(len(clients)), n, lr=lr, local_steps=steps)


def test_scaffold_client_adds_c_minus_c_i_and_refreshes_c_i_by_option_ii():
    c, c_i = torch.tensor([0.5, -0.5]), torch.tensor([0.25, 1.0])
    hooks, params = client({"name": "scaffold"}, torch.zeros(2), {"c.w": c}, {"c_i.w": c_i}, lr=0.1, steps=4)
    params["w"].grad = torch.tensor([1.0, 1.0])
    hooks.before_step(params, regrad=None)
    torch.testing.assert_close(params["w"].grad, torch.tensor([1.25, -0.5]))
    delta = torch.tensor([-0.2, 0.4])
    extras, state = hooks.finish(params, {"w": delta})
    new_c_i = c_i - c - delta / (4 * 0.1)  # c_i − c + (x − y)/(K η_l)
    torch.testing.assert_close(state["c_i.w"], new_c_i)
    torch.testing.assert_close(extras["dc.w"], new_c_i - c_i)


def test_scaffold_server_moves_x_by_the_mean_update_and_c_by_the_participants_share():
    s = STRATEGIES.build({"name": "scaffold", "server_lr": 0.5})
    x = {"w": torch.ones(2)}
    state = s.init(x)
    mean = Update({"w": torch.tensor([0.2, -0.4])}, {"dc.w": torch.tensor([1.0, 2.0])})
    x, state = s.aggregate(x, mean, state, info([0, 3], n=8))
    torch.testing.assert_close(x["w"], torch.tensor([1.1, 0.8]))
    torch.testing.assert_close(state["c.w"], torch.tensor([0.25, 0.5]))  # (2/8)·mean Δc
    assert s.broadcast(state).keys() == {"c.w"}


def test_fedspeed_steps_with_the_gradient_at_the_ascent_point_plus_the_prox_correction():
    w, x_t, h = torch.tensor([1.0, 1.0]), torch.tensor([0.0, 2.0]), torch.tensor([0.3, -0.1])
    hooks, params = client({"name": "fedspeed", "rho": 0.5, "lam": 0.2}, w, stored={"h.w": h}, x_t={"w": x_t})
    calls = []

    def regrad():
        calls.append(params["w"].detach().clone())
        params["w"].grad = grad(params["w"])

    params["w"].grad = grad(params["w"])
    hooks.before_step(params, regrad)
    g1 = grad(w)
    ascent = w + 0.5 * g1 / (g1.norm() + 1e-7)
    torch.testing.assert_close(calls[0], ascent)  # regrad ran once, at w + ρ g/‖g‖
    torch.testing.assert_close(params["w"].grad, grad(ascent) + 0.2 * (w - x_t + h))
    assert torch.equal(params["w"].detach(), w)  # w restored bit for bit
    _, state = hooks.finish(params, {"w": torch.tensor([0.1, 0.1])})
    torch.testing.assert_close(state["h.w"], h + 0.1)  # h_i += Δ_i


def test_fedspeed_without_ascent_computes_one_gradient_per_step():
    hooks, params = client({"name": "fedspeed", "rho": 0.0, "lam": 1.0}, torch.ones(2))
    params["w"].grad = torch.zeros(2)
    hooks.before_step(params, regrad=lambda: pytest.fail("ρ = 0 must not recompute the gradient"))


def test_fedspeed_server_adds_the_mean_of_every_clients_h():
    s = STRATEGIES.build({"name": "fedspeed"})
    x = {"w": torch.zeros(2)}
    state = s.init(x)
    x, state = s.aggregate(x, Update({"w": torch.tensor([1.0, -2.0])}), state, info([1, 2], n=4))
    # Σh = 2·mean Δ; x = x + mean Δ + Σh/4
    torch.testing.assert_close(state["h_sum.w"], torch.tensor([2.0, -4.0]))
    torch.testing.assert_close(x["w"], torch.tensor([1.5, -3.0]))


def test_fedavg_client_momentum_client_blends_its_gradient_with_the_server_direction():
    g = torch.tensor([1.0, -1.0])
    hooks, params = client({"name": "fedavg_client_momentum", "beta": 0.25}, torch.zeros(2), {"g.w": g})
    params["w"].grad = torch.tensor([4.0, 4.0])
    hooks.before_step(params, regrad=None)
    torch.testing.assert_close(params["w"].grad, torch.tensor([1.75, 0.25]))  # β·grad + (1−β)·g


def test_fedavg_client_momentum_server_reads_the_mean_direction_back_from_the_update():
    s = STRATEGIES.build({"name": "fedavg_client_momentum", "server_lr": 2.0})
    x = {"w": torch.zeros(2)}
    x, state = s.aggregate(x, Update({"w": torch.tensor([-0.4, 0.8])}), s.init(x), info([0], 1, lr=0.1, steps=4))
    torch.testing.assert_close(state["g.w"], torch.tensor([1.0, -2.0]))  # −Δ/(η_l K)
    torch.testing.assert_close(x["w"], torch.tensor([-2.0, 4.0]))  # x − γ g
    with pytest.raises(ValueError, match="client.max_steps"):
        s.aggregate(x, Update({"w": torch.zeros(2)}), state, info([0], 1, steps=0))


def test_scaffold_m_client_corrects_then_blends_and_keeps_the_mean_raw_gradient_as_c_i():
    hooks, params = client({"name": "scaffold_m", "beta": 0.5}, torch.zeros(2),
                           {"g.w": torch.ones(2), "c.w": torch.tensor([1.0, 0.0])}, {"c_i.w": torch.tensor([0.0, 1.0])})
    raw = [torch.tensor([2.0, 2.0]), torch.tensor([4.0, 0.0])]
    for g in raw:
        params["w"].grad = g.clone()
        hooks.before_step(params, regrad=None)
    torch.testing.assert_close(params["w"].grad, 0.5 * (raw[1] + torch.tensor([1.0, -1.0])) + 0.5)
    extras, state = hooks.finish(params, {"w": torch.zeros(2)})
    torch.testing.assert_close(state["c_i.w"], torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(extras["dc.w"], torch.tensor([3.0, 0.0]))


def test_fedamd_draws_anchors_with_probability_p_the_same_way_every_time():
    draws = [is_anchor(0.2, 7, r, c) for r in range(200) for c in range(10)]
    assert draws == [is_anchor(0.2, 7, r, c) for r in range(200) for c in range(10)]
    assert abs(sum(draws) / len(draws) - 0.2) < 0.03  # 2000 draws: 3.4σ
    assert not is_anchor(0.99, 7, 0, -1)  # the engine's shape-template client is a miner


def test_fedamd_anchor_does_not_train_and_uploads_its_table_row_change():
    s = STRATEGIES.build({"name": "fedamd", "anchor_prob": 1.0})
    w, old = torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0])
    hooks, params = client({"name": "fedamd", "anchor_prob": 1.0}, w, s.init({"w": w}), {"g.w": old})
    assert hooks.num_steps(10) == 0
    extras, state = hooks.finish(params, {"w": torch.zeros(2)})
    torch.testing.assert_close(state["g.w"], grad(w))
    torch.testing.assert_close(extras["dg.w"], grad(w) - old)
    assert extras["miner"].item() == 0


def test_fedamd_miner_follows_the_sarah_recursion():
    d0 = torch.tensor([0.5, 0.5])
    hooks, params = client({"name": "fedamd", "anchor_prob": 0.0}, torch.zeros(2), {"table_mean.w": d0})
    p, lr = params["w"], 0.1

    def regrad():
        p.grad = grad(p)

    w0 = p.detach().clone()
    p.grad = grad(p)
    hooks.before_step(params, regrad)
    torch.testing.assert_close(p.grad, d0)  # the first step follows d_0 as is
    with torch.no_grad():
        p -= lr * p.grad
    w1 = p.detach().clone()
    p.grad = grad(p)
    hooks.before_step(params, regrad)
    torch.testing.assert_close(p.grad, d0 + grad(w1) - grad(w0))  # d_1 = d_0 + ∇f(w_1) − ∇f(w_0)
    assert torch.equal(p.detach(), w1)
    extras, state = hooks.finish(params, {"w": w1 - w0})
    assert extras["miner"].item() == 1 and not extras["dg.w"].any() and state is None


def test_fedamd_server_averages_the_miners_only_and_updates_the_table_mean():
    s = STRATEGIES.build({"name": "fedamd", "server_lr": 1.0})
    x = {"w": torch.zeros(2)}
    # 4 sampled: 1 anchor (Δ = 0, row change r) and 3 miners with mean update m
    m, r = torch.tensor([0.3, -0.3]), torch.tensor([4.0, 8.0])
    mean = Update({"w": 3 * m / 4}, {"dg.w": r / 4, "miner": torch.tensor([0.75])})
    x, state = s.aggregate(x, mean, s.init(x), info([0, 1, 2, 3], n=8))
    torch.testing.assert_close(x["w"], m)
    torch.testing.assert_close(state["table_mean.w"], r / 8)

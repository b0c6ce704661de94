"""Robust aggregation on ALGORITHMS.md's attack: n=10, f=3 Byzantine rows 1e6·1 among honest
1 + 0.1·N(0,1), d=1000 (torch.manual_seed(0)); then invariants, requirements, and the
strategies built on the rules."""
import pytest
import torch

from fedllm.registry import STRATEGIES
from fedllm.strategies import robust_rules as rules
from fedllm.strategies.base import RoundInfo, Update

F, D = 3, 1000


def attacked(seed=0, honest=7, byzantine=F, value=1e6):
    g = torch.Generator().manual_seed(seed)
    H = 1 + 0.1 * torch.randn(honest, D, generator=g, dtype=torch.float64)
    return H, torch.cat([H, torch.full((byzantine, D), value, dtype=torch.float64)])


H, X = attacked()
HONEST_MEAN = H.mean(0)


def error(v):
    return float((v - HONEST_MEAN).norm())


def test_the_mean_breaks():
    assert error(X.mean(0)) > 9e6  # reference 9.5e6


@pytest.mark.parametrize("rule, expected", [
    (lambda X: rules.median(X, F), 1.92),
    (lambda X: rules.trimmed_mean(X, F), 2.05),
    (lambda X: rules.krum(X, F), 2.82),
    (lambda X: rules.geometric_median(X), 1.40),
], ids=["median", "trimmed_mean", "krum", "geometric_median"])
def test_robust_rules_stay_within_3_of_the_honest_mean(rule, expected):
    # references: median 1.93, trimmed mean 2.04, Krum 2.82, geometric median 1.39
    assert error(rule(X)) == pytest.approx(expected, abs=0.02)
    assert error(rule(X)) < 3


def test_multi_krum_and_nnm_around_an_honest_pivot_recover_the_honest_mean():
    assert error(rules.multi_krum(X, F)) < 1e-6  # m = n − f: exactly the honest rows
    mixed = rules.nearest_neighbor_mixing(X, F)
    assert max(error(row) for row in mixed[:7]) < 1e-6  # each honest row's n − f nearest are the honest rows


@pytest.mark.parametrize("seed", range(5))
def test_median_and_trimmed_mean_stay_inside_the_honest_range(seed):
    honest, stack = attacked(seed, value=-3e4 if seed % 2 else 5.0)
    low, high = honest.min(0).values, honest.max(0).values
    for v in (rules.median(stack, F), rules.trimmed_mean(stack, F)):
        assert ((v >= low) & (v <= high)).all()


@pytest.mark.parametrize("seed", range(5))
def test_krum_returns_one_of_the_honest_inputs(seed):
    honest, stack = attacked(seed, value=2.0 + seed)
    chosen = rules.krum(stack, F)
    assert any(torch.equal(chosen, row) for row in honest)


def test_bulyan_with_n_4f_plus_3_stays_inside_the_honest_range():
    honest, stack = attacked(honest=12, byzantine=3)  # n = 15 = 4f + 3
    v = rules.bulyan(stack, F)
    assert ((v >= honest.min(0).values) & (v <= honest.max(0).values)).all()
    assert float((v - honest.mean(0)).norm()) < 3


def test_geometric_median_is_the_plain_mean_on_identical_inputs():
    same = torch.ones(4, 3)
    torch.testing.assert_close(rules.geometric_median(same), torch.ones(3))


def test_centered_clipping_moves_at_most_l_tau_per_call_and_stays_near_the_honest_mean():
    previous = torch.zeros(D, dtype=torch.float64)
    tau, iterations = 0.5, 3
    for _ in range(40):
        v = rules.centered_clip(X, previous, tau, iterations)
        assert float((v - previous).norm()) <= iterations * tau + 1e-9
        previous = v
    # the honest rows are 1·√1000 ≈ 31.6 away from 0; the clipped Byzantine pull is bounded
    assert error(previous) < 0.5 * float(HONEST_MEAN.norm())


@pytest.mark.parametrize("call, needed", [
    (lambda X: rules.krum(X, 4), "n ≥ 2f+3 = 11"),
    (lambda X: rules.multi_krum(X, 4), "n ≥ 2f+3 = 11"),
    (lambda X: rules.bulyan(X, 3), "n ≥ 4f+3 = 15"),
    (lambda X: rules.median(X, 5), "n ≥ 2f+1 = 11"),
    (lambda X: rules.trimmed_mean(X, 5), "n ≥ 2·trim+1 = 11"),
    (lambda X: rules.nearest_neighbor_mixing(X, 5), "n ≥ 2f+1 = 11"),
])
def test_a_rule_without_enough_clients_for_f_says_what_it_needs(call, needed):
    with pytest.raises(ValueError, match=needed.replace("+", r"\+")) as err:
        call(X)
    assert "got n=10" in str(err.value) and "clients_per_round" in str(err.value)


def test_trimming_fewer_than_f_is_refused():
    with pytest.raises(ValueError, match="trim ≥ f"):
        rules.trimmed_mean(X, F, trim=2)


def messages(stack, key_shapes={"a.weight": (2, 3), "b.weight": (4,)}):
    """Rows of `stack` split into named tensors: the (client_id, message, weight) list the
    engine hands to a non-linear strategy."""
    out = []
    for i, row in enumerate(stack):
        parts, offset = {}, 0
        for k, shape in sorted(key_shapes.items()):
            n = torch.Size(shape).numel()
            parts[k] = row[offset : offset + n].reshape(shape).float()
            offset += n
        out.append((i, Update(parts), 1.0))
    return out


def test_a_robust_strategy_moves_x_by_server_lr_times_the_rule_on_the_whole_vector():
    g = torch.Generator().manual_seed(1)
    honest = 1 + 0.1 * torch.randn(7, 10, generator=g)
    stack = torch.cat([honest, torch.full((3, 10), 1e6)])
    s = STRATEGIES.build({"name": "trimmed_mean", "f": 3, "nnm": True, "server_lr": 0.5})
    x = {"a.weight": torch.zeros(2, 3), "b.weight": torch.ones(4)}
    info = RoundInfo(0, list(range(10)), 10.0, 10)
    new, _ = s.aggregate(x, messages(stack), s.init(x), info)
    expected = rules.trimmed_mean(rules.nearest_neighbor_mixing(stack, 3), 3)
    torch.testing.assert_close(new["a.weight"].reshape(-1), 0.5 * expected[:6])
    torch.testing.assert_close(new["b.weight"], 1 + 0.5 * expected[6:])


def test_centered_clip_strategy_starts_from_its_checkpointed_previous_aggregate():
    s = STRATEGIES.build({"name": "centered_clip", "tau": 0.1, "iterations": 1, "f": 1})
    x = {"b.weight": torch.zeros(4)}
    state = s.init(x)
    ones = [(i, Update({"b.weight": torch.ones(4)}), 1.0) for i in range(3)]
    x, state = s.aggregate(x, ones, state, RoundInfo(0, [0, 1, 2], 3.0, 3))
    torch.testing.assert_close(state["previous.b.weight"], torch.full((4,), 0.05))  # moved τ along (1,1,1,1)/2
    x, state = s.aggregate(x, ones, state, RoundInfo(1, [0, 1, 2], 3.0, 3))
    torch.testing.assert_close(state["previous.b.weight"], torch.full((4,), 0.10))


def test_client_momentum_is_kept_per_client_and_is_what_gets_aggregated():
    s = STRATEGIES.build({"name": "median", "f": 0, "momentum": 0.75})
    hooks = s.client_hooks(0, 0)
    p = {"b.weight": torch.nn.Parameter(torch.zeros(4))}
    from fedllm.strategies.base import ClientContext

    hooks.begin(p, ClientContext(0, 0, {"b.weight": torch.zeros(4)}, {}, {"m.b.weight": torch.full((4,), 2.0)}, 0.1, 1))
    extras, state = hooks.finish(p, {"b.weight": torch.full((4,), 4.0)})
    torch.testing.assert_close(state["m.b.weight"], torch.full((4,), 2.5))  # 0.75·2 + 0.25·4
    torch.testing.assert_close(extras["m.b.weight"], state["m.b.weight"])
    msgs = [(i, Update({"b.weight": torch.full((4,), 100.0)}, {"m.b.weight": torch.full((4,), float(i))}), 1.0) for i in range(3)]
    new, _ = s.aggregate({"b.weight": torch.zeros(4)}, msgs, {}, RoundInfo(0, [0, 1, 2], 3.0, 3))
    torch.testing.assert_close(new["b.weight"], torch.ones(4))  # the median of the momenta, not of Δ


def test_incompatible_robust_options_are_refused():
    with pytest.raises(ValueError, match="nnm with f=0"):
        STRATEGIES.build({"name": "median", "nnm": True})
    with pytest.raises(ValueError, match="momentum must be in"):
        STRATEGIES.build({"name": "krum", "f": 1, "momentum": 1.0})

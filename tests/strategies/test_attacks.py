"""Simulated Byzantine clients: which messages each attack rewrites and into what, label
flipping on tokenized examples, and the recipe's `byzantine:` section."""
from statistics import NormalDist

import pytest
import torch
from quadratic import Quadratic, simulate

from fedllm.attacks import split_response
from fedllm.recipe import recipe_from_dict
from fedllm.registry import ATTACKS, RecipeError, STRATEGIES
from fedllm.strategies.base import Update
from fedllm.wire import with_extras

BYZANTINE = {1, 4}


def round_messages():
    g = torch.Generator().manual_seed(0)
    return [(i, Update({"w": torch.randn(3, 2, generator=g)}, {"m.w": torch.randn(3, 2, generator=g)}), 1.0 + i)
            for i in range(6)]


def poisoned(spec):
    kept = round_messages()
    out = ATTACKS.build(spec).poison_updates(kept, BYZANTINE, round=0)
    as_sent = lambda messages: [(i, with_extras(m.delta, m.extras), w) for i, m, w in messages]  # noqa: E731
    return as_sent(kept), as_sent(out)  # both parts, named as on the wire


def honest(kept, key):
    return torch.stack([m[key] for i, m, _ in kept if i not in BYZANTINE])


def test_sign_flip_negates_every_tensor_of_the_byzantine_messages_only():
    kept, out = poisoned({"name": "sign_flip", "count": 2, "scale": 3.0})
    for (i, before, w), (j, after, w2) in zip(kept, out):
        assert (i, w) == (j, w2)
        for k in before:
            expected = -3.0 * before[k] if i in BYZANTINE else before[k]
            assert torch.equal(after[k], expected)


def test_large_norm_scales_the_byzantine_messages():
    kept, out = poisoned({"name": "large_norm", "count": 2})
    assert torch.equal(out[1][1]["w"], 1e3 * kept[1][1]["w"]) and torch.equal(out[0][1]["w"], kept[0][1]["w"])


def test_alie_sends_mu_minus_z_sigma_of_the_honest_messages_with_the_papers_z():
    kept, out = poisoned({"name": "alie", "count": 2})
    n, f = 6, 2
    z = NormalDist().inv_cdf((n - (n // 2 + 1 - f)) / n)  # s = ⌊n/2+1⌋ − f = 2 → Φ⁻¹(4/6)
    for key in ("w", "strategy/m.w"):
        h = honest(kept, key)
        torch.testing.assert_close(out[4][1][key], h.mean(0) - z * h.std(0, correction=0))
    assert z == pytest.approx(0.4307, abs=1e-4)


def test_ipm_sends_minus_epsilon_times_the_honest_mean():
    kept, out = poisoned({"name": "ipm", "count": 2, "epsilon": 0.5})
    torch.testing.assert_close(out[1][1]["w"], -0.5 * honest(kept, "w").mean(0))
    assert torch.equal(out[2][1]["w"], kept[2][1]["w"])


def example(prompt, response):
    return {"input_ids": prompt + response, "labels": [-100] * len(prompt) + response}


def test_label_flip_gives_every_prompt_another_examples_response():
    examples = [example([1, 2, i], [100 + i] * (i + 1)) for i in range(6)]
    out = ATTACKS.build({"name": "label_flip"}).poison_data(examples, seed=3)
    responses = {tuple(split_response(e)[1]) for e in examples}
    limit = max(len(e["input_ids"]) for e in examples)
    for before, after in zip(examples, out):
        prompt, response, labels = split_response(after)
        assert prompt == split_response(before)[0]  # the prompt is kept...
        assert tuple(response) in responses and response != split_response(before)[1]  # ...its answer is not
        assert labels == response and len(after["input_ids"]) <= limit
    assert sorted(tuple(split_response(e)[1]) for e in out) == sorted(responses)  # a permutation


def test_the_byzantine_clients_are_drawn_once_from_the_seed():
    attack = ATTACKS.build({"name": "sign_flip", "count": 3})
    chosen = attack.choose(10, seed=5)
    assert len(chosen) == 3 and chosen == attack.choose(10, seed=5) and chosen <= set(range(10))


def test_the_recipe_section_validates_the_attack_and_its_options():
    recipe = recipe_from_dict({"byzantine": {"name": "alie", "count": 2}})
    assert recipe.byzantine == {"name": "alie", "count": 2, "z": None}
    with pytest.raises(RecipeError, match="did you mean 'sign_flip'"):
        recipe_from_dict({"byzantine": {"name": "signflip"}})
    with pytest.raises(RecipeError, match="byzantine.scal"):
        recipe_from_dict({"byzantine": {"name": "sign_flip", "scal": 2}})


def test_on_the_quadratic_sign_flippers_break_fedavg_but_not_the_median():
    problem = Quadratic.reference()
    attack, byzantine = ATTACKS.build({"name": "sign_flip", "count": 2, "scale": 4.0}), frozenset({0, 5})
    setup = dict(rounds=30, lr=0.05, steps=5, attack=attack, byzantine=byzantine)
    fedavg = simulate(STRATEGIES.build({"name": "fedavg"}), problem, **setup)
    median = simulate(STRATEGIES.build({"name": "median", "f": 2}), problem, **setup)
    clean = simulate(STRATEGIES.build({"name": "fedavg"}), problem, rounds=30, lr=0.05, steps=5)
    # 0.8·Δ_honest − 0.2·4·Δ_byz: FedAvg walks away; the median stays in the honest clients' range
    assert fedavg.error(problem) > 10 * clean.error(problem)
    assert median.error(problem) < 2.0

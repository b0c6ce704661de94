"""The recipe's privacy: section: it sets the budget (the z the strategy options used to
choose), a budget key on the strategy or a section no strategy reads is an error, and the
noise is secret (two runs differ) unless privacy.noise_seed makes it reproducible, with the
server's noise stream continuing exactly across a checkpoint."""
import inspect

import pytest
import torch
from safetensors.torch import load, save

from fedllm.recipe import load_recipe, recipe_from_dict
from fedllm.registry import STRATEGIES, RecipeError
from fedllm.strategies.base import ClientContext, RoundInfo
from fedllm.strategies.base import Update

SIZES = [64, 32, 128]  # batch 8: sampling rates 1/8, 1/4, 1/16


def built(name, run_info, privacy=None, **options):
    s = STRATEGIES.build({"name": name, **options})
    s.setup(run_info(rounds=5, num_clients=3, client_sizes=SIZES, local_steps=[4, 2, 8], batch_size=8, privacy=privacy))
    return s


@pytest.mark.parametrize("name, z", [("dp_fedavg", 3.33902), ("dp_sgd", 1.66310), ("dp_brem", 0.164608)])
def test_privacy_target_epsilon_chooses_the_noise(run_info, name, z):
    new = built(name, run_info, privacy={"target_epsilon": 3.0})
    assert new.budget.noise_multiplier == pytest.approx(z, abs=1e-5)  # as the strategy option of old chose it
    assert (new.budget.delta, new.budget.method, new.budget.limit) == (1e-5, "rdp", 3.0)  # the defaults
    tighter = built(name, run_info, privacy={"target_epsilon": 3.0, "delta": 1e-7, "max_epsilon": 4.0})
    assert tighter.budget.noise_multiplier > z and (tighter.budget.delta, tighter.budget.limit) == (1e-7, 4.0)


def test_a_recipe_privacy_section_reaches_the_strategy_unchanged(run_info):
    recipe = recipe_from_dict({"strategy": {"name": "dp_fedavg"}, "privacy": {"noise_multiplier": 1.0, "max_epsilon": 8}})
    assert recipe.privacy.model_dump() == {"target_epsilon": None, "noise_multiplier": 1.0, "delta": None,
                                           "max_epsilon": 8.0, "accountant": None, "noise_seed": None}
    s = built("dp_fedavg", run_info, privacy=recipe.privacy.model_dump())
    assert (s.budget.noise_multiplier, s.budget.limit) == (1.0, 8.0)
    assert recipe_from_dict({}).privacy is None  # absent: None (a DP strategy then has no budget: an error)


@pytest.mark.parametrize("name", ["dp_fedavg", "dp_sgd", "dp_brem"])
@pytest.mark.parametrize("key, value", [("target_epsilon", 3.0), ("noise_multiplier", 1.0), ("delta", 1e-6),
                                        ("max_epsilon", 8.0), ("accountant", "pld"), ("noise_seed", 1)])
def test_a_budget_option_on_the_strategy_says_where_it_moved(name, key, value):
    for privacy in (None, {"target_epsilon": 1.0}):  # with or without a privacy: section
        with pytest.raises(RecipeError) as err:
            recipe_from_dict({"strategy": {"name": name, key: value}, "privacy": privacy})
        assert str(err.value).startswith(f"set privacy.{key} instead of strategy.{key}") and "\n" not in str(err.value)
    with pytest.raises(RecipeError, match=f"unknown key 'strategy.{key}'"):  # built directly: not an option either
        STRATEGIES.build({"name": name, key: value}, "strategy")


def test_a_budget_override_on_the_strategy_says_where_it_moved(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("strategy: {name: dp_fedavg, clip_norm: 2.0}\nprivacy: {noise_multiplier: 1.0}\n")
    with pytest.raises(RecipeError, match="set privacy.max_epsilon instead of strategy.max_epsilon"):
        load_recipe(path, ["strategy.max_epsilon=8"])
    assert load_recipe(path, ["privacy.max_epsilon=8"]).strategy["clip_norm"] == 2.0  # the strategy's own options stay


def test_a_privacy_section_with_a_strategy_that_ignores_it_is_an_error():
    with pytest.raises(RecipeError) as err:
        recipe_from_dict({"strategy": {"name": "fedavg"}, "privacy": {"target_epsilon": 3.0}})
    text = str(err.value)
    assert "strategy 'fedavg' would ignore it" in text and "dp_fedavg" in text and "dp_sgd" in text and "dp_brem" in text


def test_privacy_keys_are_strict_and_typed():
    with pytest.raises(RecipeError) as err:
        recipe_from_dict({"strategy": {"name": "dp_fedavg"}, "privacy": {"target_epsilo": 3.0}})
    assert "privacy.target_epsilo" in str(err.value) and "did you mean 'target_epsilon'" in str(err.value)
    with pytest.raises(RecipeError, match="privacy.delta"):
        recipe_from_dict({"strategy": {"name": "dp_fedavg"}, "privacy": {"target_epsilon": 3.0, "delta": 2}})


# ---- the noise -------------------------------------------------------------------------------
def server_noise(s, state, rounds):
    """What the server adds to all-zero updates, round after round (the updates' noise alone)."""
    x, drawn = {"w": torch.zeros(1000)}, []
    for t in rounds:
        info = RoundInfo(t, [0, 1, 2], 3.0, 3)
        updates = Update(x) if s.needs != "all" else [(c, Update({"w": torch.zeros(1000)}), 1.0) for c in range(3)]
        new, state = s.aggregate(x, updates, state, info)
        drawn.append(new["w"])
    return torch.stack(drawn), state


@pytest.mark.parametrize("name", ["dp_fedavg", "dp_brem"])
def test_server_noise_is_secret_unless_seeded(run_info, name):
    def noise(privacy):
        s = built(name, run_info, privacy=privacy)
        return server_noise(s, s.init({"w": torch.zeros(1000)}), range(2))[0]

    a, b = noise({"noise_multiplier": 1.0}), noise({"noise_multiplier": 1.0})
    assert a.std() > 0.05 and not torch.allclose(a, b)  # two runs of one recipe: independent noise
    c, d = noise({"noise_multiplier": 1.0, "noise_seed": 7}), noise({"noise_multiplier": 1.0, "noise_seed": 7})
    assert torch.equal(c, d) and not torch.allclose(c, noise({"noise_multiplier": 1.0, "noise_seed": 8}))


@pytest.mark.parametrize("name", ["dp_fedavg", "dp_brem"])
def test_a_resumed_run_continues_the_secret_noise_stream_exactly(run_info, name):
    first = built(name, run_info, privacy={"noise_multiplier": 1.0})
    state = first.init({"w": torch.zeros(1000)})
    straight, _ = server_noise(first, state, range(4))
    _, state = server_noise(first, state, range(2))
    checkpoint = save(state)  # as the engine checkpoints server state (safetensors)
    assert state["privacy/noise_rng"].dtype == torch.uint8
    resumed = built(name, run_info, privacy={"noise_multiplier": 1.0})  # a fresh process: its own secret seed...
    resumed.init({"w": torch.zeros(1000)})
    after, _ = server_noise(resumed, load(checkpoint), range(2, 4))  # ...but the checkpoint's stream
    assert torch.equal(after, straight[2:])


def client_noise(s, round=0, client=0):
    """The gradient a DP-SGD client steps on when every per-example gradient is 0: the noise."""
    params = {"w": torch.nn.Parameter(torch.zeros(1000))}
    hooks = s.client_hooks(round, client)
    hooks.begin(params, ClientContext(round, client, {"w": torch.zeros(1000)}, {}, {}, 0.1, 1))
    hooks.backward({"x": torch.zeros(4, 1000), "y": torch.zeros(4)},
                   lambda b: ((b["x"] @ params["w"] - b["y"]) ** 2).mean(), default=None)
    hooks.before_step(params, regrad=None)
    return params["w"].grad.clone()


def test_client_noise_is_secret_unless_seeded(run_info):
    secret = built("dp_sgd", run_info, privacy={"noise_multiplier": 1.0})
    a, b = client_noise(secret), client_noise(secret)
    assert a.std() == pytest.approx(1.0 * 1.0 / 4, rel=0.1) and not torch.allclose(a, b)  # σC/B; fresh each local round
    seeded = [built("dp_sgd", run_info, privacy={"noise_multiplier": 1.0, "noise_seed": 7}) for _ in range(2)]
    assert torch.equal(client_noise(seeded[0]), client_noise(seeded[1]))  # reproducible across runs...
    assert not torch.allclose(client_noise(seeded[0], 0, 0), client_noise(seeded[0], 0, 1))  # ...per (round, client)
    assert not torch.allclose(client_noise(seeded[0], 0, 0), client_noise(seeded[0], 1, 0))


def test_client_noise_is_not_stored_or_sent(run_info):
    s = built("dp_sgd", run_info, privacy={"noise_multiplier": 1.0})
    hooks = s.client_hooks(0, 0)
    params = {"w": torch.nn.Parameter(torch.zeros(3))}
    hooks.begin(params, ClientContext(0, 0, {"w": torch.zeros(3)}, {}, {}, 0.1, 1))
    assert hooks.finish(params, {"w": torch.zeros(3)}) == ({}, None)  # nothing for the client store or the upload


def test_a_wrapper_sets_up_its_inner_strategy_without_the_privacy_section(run_info):
    seen = []

    @STRATEGIES.register("test_setup_recorder")
    class Recorder(STRATEGIES.get("fedavg")):
        def setup(self, run):
            seen.append(run.privacy)

    built("dp_sgd", run_info, privacy={"noise_multiplier": 1.0}, inner={"name": "test_setup_recorder"})
    assert seen == [None]


def engine_passes_privacy() -> bool:
    from fedllm.engine import Federation

    return "privacy" in inspect.getsource(Federation.run_info)


@pytest.mark.skipif(not engine_passes_privacy(), reason="the engine does not pass recipe.privacy in RunInfo yet")
def test_the_engine_gives_the_privacy_section_to_the_strategy(recipe_file):
    import json

    from fedllm.engine import run_recipe

    path = recipe_file(strategy={"name": "dp_fedavg", "clip_norm": 1.0}, privacy={"noise_multiplier": 1.0, "noise_seed": 3},
                       federation={"rounds": 1, "num_clients": 3, "clients_per_round": 3}, eval={"every": 0})
    rows = [json.loads(line) for line in (run_recipe(str(path)) / "metrics.jsonl").read_text().splitlines()]
    assert round(rows[0]["epsilon"], 2) == 4.73 and rows[0]["noise_multiplier"] == 1.0  # q = 1, z = 1, δ = 1e-5


def test_an_engine_run_resumed_from_a_checkpoint_redoes_the_last_round_with_the_same_secret_noise(recipe_file):
    import shutil

    from safetensors.torch import load_file

    from fedllm.engine import resume_run, run_recipe
    from fedllm.state import checkpoint_dirs

    path = recipe_file(strategy={"name": "dp_fedavg", "clip_norm": 1.0}, privacy={"noise_multiplier": 1.0},  # no noise_seed: secret
                       federation={"rounds": 3, "num_clients": 3, "clients_per_round": 3}, eval={"every": 0},
                       output={"checkpoint_every": 1, "keep_last": 0})
    run_dir = run_recipe(str(path))
    straight = load_file(str(run_dir / "final" / "adapter_model.safetensors"))
    shutil.rmtree(checkpoint_dirs(run_dir)[-1])  # as if the run had died during its last round
    shutil.rmtree(run_dir / "final")
    resume_run(str(run_dir))  # a new process would draw a new secret seed; the checkpoint's stream wins
    resumed = load_file(str(run_dir / "final" / "adapter_model.safetensors"))
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)

"""Recipes: strict keys with the nearest match, typed values, dotted overrides, plugin options."""
from pathlib import Path

import pytest

from fedllm.recipe import dump_recipe, load_recipe, recipe_from_dict
from fedllm.registry import STRATEGIES, RecipeError
from fedllm.strategies.base import RunInfo

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.federation.rounds > 0
    # the strategy accepts the planned run shape (robust rules' n-vs-f, DP calibration)
    f = recipe.federation
    sizes = [20] * f.num_clients
    run = RunInfo(f.rounds, f.num_clients, f.sampled_per_round(), f.sampler["name"], sizes,
                  [recipe.client.max_steps or 1] * f.num_clients, recipe.client.per_device_train_batch_size, recipe.seed,
                  recipe.privacy.model_dump() if recipe.privacy else None)
    STRATEGIES.build(recipe.strategy).setup(run)


def test_a_mistyped_key_names_the_nearest_valid_key():
    with pytest.raises(RecipeError) as err:
        recipe_from_dict({"federation": {"num_client": 5}})
    text = str(err.value)
    assert "federation.num_client" in text and "did you mean 'num_clients'" in text and "rounds" in text


def test_a_mistyped_section_names_the_nearest_section():
    with pytest.raises(RecipeError, match="did you mean 'client'"):
        recipe_from_dict({"clients": {}})


def test_a_wrong_type_names_the_key_and_the_expected_type():
    with pytest.raises(RecipeError) as err:
        recipe_from_dict({"client": {"learning_rate": "fast"}})
    assert "client.learning_rate" in str(err.value) and "number" in str(err.value)


def test_an_unknown_plugin_lists_the_known_ones():
    with pytest.raises(RecipeError) as err:
        recipe_from_dict({"strategy": {"name": "fedavgg"}})
    assert "did you mean 'fedavg'" in str(err.value) and "fedprox" in str(err.value)


def test_an_unknown_plugin_option_names_the_valid_options():
    with pytest.raises(RecipeError) as err:
        recipe_from_dict({"adapter": {"name": "lora", "rank": 4}})
    assert "adapter.rank" in str(err.value) and "did you mean 'r'" in str(err.value)


def test_plugin_options_are_typed_and_get_defaults():
    recipe = recipe_from_dict({"strategy": {"name": "fedprox", "mu": "0.5"}})
    assert recipe.strategy == {"name": "fedprox", "mu": 0.5, "server_lr": 1.0}
    with pytest.raises(RecipeError, match="strategy.mu"):
        recipe_from_dict({"strategy": {"name": "fedprox", "mu": "lots"}})


def test_dotted_overrides_are_parsed_as_yaml(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("federation:\n  rounds: 3\n")
    recipe = load_recipe(path, ["federation.rounds=20", "adapter.r=16", "client.bf16=true", "data.max_samples=100"])
    assert recipe.federation.rounds == 20 and recipe.adapter["r"] == 16 and recipe.client.bf16 is True
    assert recipe.data.max_samples == 100


def test_a_malformed_override_says_the_expected_form(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("{}")
    with pytest.raises(RecipeError, match="key.path=value"):
        load_recipe(path, ["federation.rounds"])


def test_more_sampled_clients_than_clients_is_an_error():
    with pytest.raises(RecipeError, match="only 4 clients"):
        recipe_from_dict({"federation": {"num_clients": 4, "clients_per_round": 5}})


def test_fraction_picks_the_clients_per_round():
    recipe = recipe_from_dict({"federation": {"num_clients": 100, "fraction": 0.05}})
    assert recipe.federation.sampled_per_round() == 5


def test_the_privacy_section_is_optional_strict_and_set_by_overrides(tmp_path):
    assert recipe_from_dict({}).privacy is None  # absent: no privacy settings at all
    path = tmp_path / "r.yaml"
    path.write_text("strategy:\n  name: dp_fedavg\n")
    recipe = load_recipe(path, ["privacy.target_epsilon=3", "privacy.noise_seed=7"])  # the section starts empty
    assert (recipe.privacy.target_epsilon, recipe.privacy.noise_seed, recipe.privacy.delta) == (3.0, 7, None)
    assert load_recipe(path, ["privacy.target_epsilon=3"]).privacy.noise_seed is None  # secret noise by default
    again = tmp_path / "again.yaml"
    again.write_text(dump_recipe(recipe))  # a run directory's recipe.yaml reloads (resume) without a conflict
    assert load_recipe(again).privacy == recipe.privacy
    with pytest.raises(RecipeError) as err:
        recipe_from_dict({"strategy": {"name": "dp_fedavg"}, "privacy": {"noise_sed": 1}})
    assert "privacy.noise_sed" in str(err.value) and "did you mean 'noise_seed'" in str(err.value)
    with pytest.raises(RecipeError, match="'privacy.noise_multiplier'"):
        recipe_from_dict({"strategy": {"name": "dp_fedavg"}, "privacy": {"noise_multiplier": 0}})
    with pytest.raises(RecipeError, match="strategy 'fedprox' would ignore it"):
        recipe_from_dict({"strategy": {"name": "fedprox"}, "privacy": {"noise_seed": 1}})

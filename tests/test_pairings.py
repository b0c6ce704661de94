"""Pairings a method was not derived for are named when the recipe loads, and `fedllm list`
says which local optimizer each strategy assumes, with whole one-line descriptions."""
import logging

import pytest

from fedllm.capabilities import check_pairings
from fedllm.cli import main
from fedllm.recipe import load_recipe, recipe_from_dict
from fedllm.registry import RecipeError


@pytest.mark.parametrize("strategy", ["scaffold", "scaffold_m", "fedspeed", "fedavg_client_momentum"])
def test_an_sgd_strategy_with_adamw_local_steps_warns_with_the_fix(recipe_file, caplog, strategy):
    recipe = load_recipe(recipe_file(strategy={"name": strategy}, client={"optim": "adamw"}))
    with caplog.at_level(logging.WARNING, logger="fedllm"):
        check_pairings(recipe)
    assert f"strategy '{strategy}' is derived for client.optim=sgd local steps; with client.optim=adamw" in caplog.text
    assert "set client.optim=sgd" in caplog.text


def test_the_paired_optimizer_and_an_optimizer_free_strategy_are_quiet(recipe_file, caplog):
    with caplog.at_level(logging.WARNING, logger="fedllm"):
        check_pairings(load_recipe(recipe_file(strategy={"name": "scaffold"}, client={"optim": "sgd"})))
        check_pairings(load_recipe(recipe_file(strategy={"name": "fedavg"}, client={"optim": "adamw"})))
    assert "derived for" not in caplog.text


def test_list_names_each_strategys_local_optimizer_and_whole_descriptions(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "  scaffold: SCAFFOLD: client gradients corrected by c − c_i (option II control variates). [local steps: sgd]" in out
    assert "[local steps: any client.optim]" in out.split("\n  fedavg:")[1].split("\n")[0]
    # a docstring's first paragraph, not its first line
    assert "`split_steps: null` = client.max_steps." in out
    assert "server_lr: float | None = None" in out


def test_an_unknown_strategy_lists_the_known_strategies():
    with pytest.raises(RecipeError, match="Known strategies: "):
        recipe_from_dict({"strategy": {"name": "fedsgd"}})

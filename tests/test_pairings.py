"""Pairings a method was not derived for are named when the recipe loads, and `fedllm list`
says which local optimizer each strategy assumes, with whole one-line descriptions."""
import logging
import subprocess
import sys
from pathlib import Path

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


# ---- the federation's mode: async / buffered, and a Flower deployment -----------------------
ROOT = Path(__file__).parents[1]
ASYNC = {"federation": {"num_clients": 4, "clients_per_round": 3, "mode": "async", "devices": {"profile": "lognormal"}}}
BUFFERED = {"federation": {**ASYNC["federation"], "mode": "buffered"}}
DEVICES = {"federation": {"devices": {"profile": "lognormal"}}}
ATTACK = {"byzantine": {"name": "sign_flip"}}
OWN_AGGREGATION = ("adapter 'ferret' aggregates in its own way under strategy 'fedavg', and federation.mode=async applies "
                   "updates through the strategy's plain collector: use federation.mode=sync")


@pytest.mark.parametrize("sections, deployed, message", [
    ({**ASYNC, "adapter": {"name": "ferret"}}, False, OWN_AGGREGATION),
    ({**ASYNC, "strategy": {"name": "krum"}}, False,
     "strategy 'krum' needs every update of a round, and federation.mode=async applies each arrival alone: use "
     "federation.mode=buffered (over each buffer of K) or sync"),
    ({**ASYNC, **ATTACK}, False, "byzantine 'sign_flip' simulates an attack, which federation.mode=async does not: "
                                 "remove byzantine, or use federation.mode=sync"),
    (DEVICES, True, "federation.devices simulates client devices, and a Flower deployment (fedllm serve) has real ones: "
                    "remove federation.devices, or use `fedllm run` (simulation)"),
    (ATTACK, True, "byzantine 'sign_flip' simulates attackers, and a Flower deployment (fedllm serve) has real parties: "
                   "remove byzantine, or use `fedllm run` (simulation)"),
], ids=["async+ferret", "async+krum", "async+byzantine", "deployed+devices", "deployed+byzantine"])
def test_a_mode_pairing_that_cannot_run_fails_at_check_pairings(sections, deployed, message):
    with pytest.raises(RecipeError) as caught:
        check_pairings(recipe_from_dict(sections), deployed=deployed)
    assert str(caught.value) == message


def test_async_on_several_launched_ranks_fails_at_check_pairings(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun, accelerate launch and --processes set it in each rank
    with pytest.raises(RecipeError) as caught:
        check_pairings(recipe_from_dict(ASYNC))
    assert str(caught.value) == ("federation.mode=async runs in one process, and this launch starts 2: launch one process "
                                 "(no torchrun, accelerate launch or --processes), or use federation.mode=sync")


def test_async_on_forked_ranks_fails_before_any_rank_starts(recipe_file, capsys):
    assert main(["run", str(recipe_file(**ASYNC)), "--processes", "2"]) == 2
    assert "federation.mode=async runs in one process, and this launch starts 2" in capsys.readouterr().err


@pytest.mark.parametrize("sections, deployed", [
    ({**BUFFERED, "strategy": {"name": "krum"}}, False),
    ({**BUFFERED, "adapter": {"name": "ferret"}, "strategy": {"name": "krum"}}, False),  # its own aggregation: plain means
    ({**DEVICES, **ATTACK}, False),  # simulated in sync mode
    ({}, True),
], ids=["buffered+krum", "buffered+ferret+krum", "sync+devices+byzantine", "deployed"])
def test_mode_pairings_that_can_run_pass(sections, deployed):
    check_pairings(recipe_from_dict(sections), deployed=deployed)


def test_an_async_pairing_fails_on_the_command_line_before_the_data_is_prepared(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fedllm", "run", "recipes/async_quickstart.yaml", "adapter.name=ferret",
                           f"output.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert errors == [f"fedllm: error: {OWN_AGGREGATION}"], done.stderr
    assert "Traceback" not in done.stderr
    assert "data:" not in done.stdout + done.stderr  # fedllm.data's report: nothing was prepared
    assert not any(tmp_path.iterdir())

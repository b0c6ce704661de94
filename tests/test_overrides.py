"""Overrides that switch a plugin keep only the options the new plugin takes (with a note), and
`fedllm resume RUN key=value` changes only what the rounds already run did not depend on."""
import json
import logging
from pathlib import Path

import pytest

from fedllm.cli import main
from fedllm.engine import resume_run, run_recipe
from fedllm.recipe import check_resume_overrides, dump_recipe, load_recipe
from fedllm.registry import RecipeError

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SMALL = ["data.max_samples=120", "data.max_length=128", "federation.rounds=1", "federation.num_clients=3",
         "federation.clients_per_round=3", "client.max_steps=1", "eval.max_batches=1", "output.progress=false"]


def test_switching_lora_to_ferret_drops_the_lora_options_with_a_note(caplog):
    with caplog.at_level(logging.INFO, logger="fedllm"):
        recipe = load_recipe(RECIPES / "quickstart.yaml", ["adapter.name=ferret", "adapter.k=8"])
    assert recipe.adapter["name"] == "ferret" and recipe.adapter["k"] == 8 and "r" not in recipe.adapter
    notes = [r.getMessage() for r in caplog.records if "note:" in r.getMessage()]
    assert notes == ["note: adapter.name=ferret: dropped lora's options r, alpha, dropout, target_modules "
                     "(ferret does not take them)"]


def test_options_the_new_plugin_takes_are_kept_and_explicit_ones_are_checked():
    recipe = load_recipe(RECIPES / "quickstart.yaml", ["adapter.name=ffa_lora"])
    assert (recipe.adapter["r"], recipe.adapter["alpha"], recipe.adapter["target_modules"]) == (16, 32.0, "all-linear")
    # an option given on the command line is never dropped silently: the new plugin must take it
    with pytest.raises(RecipeError, match="unknown key 'adapter.r'"):
        load_recipe(RECIPES / "quickstart.yaml", ["adapter.name=ferret", "adapter.r=4"])


def test_the_whole_section_form_replaces_the_plugin():
    recipe = load_recipe(RECIPES / "quickstart.yaml", ["adapter={name: wara, r: 4}"])
    assert recipe.adapter["name"] == "wara" and recipe.adapter["r"] == 4 and recipe.adapter["alpha"] == 16.0


def test_switching_the_byzantine_recipe_to_fedavg_drops_f_and_nnm(caplog):
    with caplog.at_level(logging.INFO, logger="fedllm"):
        recipe = load_recipe(RECIPES / "byzantine_quickstart.yaml", ["strategy.name=fedavg"])
    assert recipe.strategy == {"name": "fedavg", "server_lr": 1.0}
    assert any("dropped trimmed_mean's options f, nnm" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
@pytest.mark.parametrize("recipe, switch", [("quickstart.yaml", "adapter.name=ferret"),
                                            ("byzantine_quickstart.yaml", "strategy.name=fedavg")])
def test_both_switched_recipes_run(tmp_path, recipe, switch):
    run_dir = run_recipe(str(RECIPES / recipe), [switch, *SMALL, f"output.dir={tmp_path}", "output.name=r"])
    assert [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1]


def test_resume_takes_more_rounds_and_refuses_a_learning_rate_change(recipe_file, capsys):
    path = recipe_file(federation={"rounds": 1}, eval={"every": 0})
    run_dir = run_recipe(str(path))
    assert main(["resume", str(run_dir), "client.learning_rate=0.1"]) == 2
    err = capsys.readouterr().err
    assert "resume cannot change client.learning_rate (the rounds already run used 0.01" in err
    assert "fedllm run ... client.learning_rate=0.1" in err
    assert main(["resume", str(run_dir), "federation.rounds=2", "eval.every=1"]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and "eval_loss" in rows[1]
    assert load_recipe(run_dir / "recipe.yaml").federation.rounds == 2  # a later resume goes on from there


@pytest.mark.parametrize("override, reason", [
    ("federation.rounds=1", "cannot set federation.rounds=1: the run has checkpointed 2 rounds"),
    ("output.name=other", "stays in the directory given"),
])
def test_resume_refuses_what_would_change_the_run(recipe_file, override, reason, tmp_path):
    run_dir = tmp_path / "runs" / "run"
    (run_dir / "checkpoints" / "round_2").mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text(dump_recipe(load_recipe(recipe_file(federation={"rounds": 3}))))
    with pytest.raises(RecipeError, match=reason):
        resume_run(str(run_dir), [override])


def test_more_rounds_are_refused_where_the_schedule_spans_the_planned_ones(recipe_file):
    saved = load_recipe(recipe_file(client={"lr_scheduler_type": "cosine"}))
    with pytest.raises(RecipeError, match="learning-rate schedule .* is spread over the planned rounds"):
        check_resume_overrides(saved, ["federation.rounds=10"])

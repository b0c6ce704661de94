"""Client groups under DeepSpeed ZeRO-3 (federation.group_parallel=zero3): the frozen base is
partitioned over the group's ranks, the adapter held whole, and the run ends where one rank
training each client with G times the batch ends. Runs wherever DeepSpeed imports (on CPU its
CPU accelerator over gloo); CI's main step does not install it, so there the run is skipped."""
import importlib.util

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fedllm.engine import run_recipe
from fedllm.registry import RecipeError
from tests.conftest import tiny_recipe
from tests.engine.test_groups import assert_rank0_held_half, assert_same_run, launch, reference  # noqa: F401  (a fixture)
from tests.privacy.test_dp_groups import dp_sgd_runs  # noqa: F401  (a fixture)
from tests.privacy.test_dp_groups import test_dp_sgd_in_a_group_of_two_trains_as_one_rank_with_twice_the_batch as dp_sgd_in_a_group


needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="DeepSpeed is not installed (pip install deepspeed; on CPU it runs over gloo)")


@pytest.mark.slow
@needs_deepspeed
def test_a_group_partitioning_the_base_with_zero3_trains_as_one_rank(reference):  # noqa: F811
    path, one_dir = reference
    run_dir = launch(path, 2, "zero3", "federation.group_size=2", "federation.group_parallel=zero3")
    # measured: adapter within 7.5e-9, stored client state within 1.2e-7 (test_groups.TOLERANCE)
    assert_same_run(run_dir, one_dir)
    assert_rank0_held_half(run_dir, one_dir)  # the base really was partitioned (the adapter is held whole)


@pytest.mark.slow
@needs_deepspeed
def test_merged_weights_written_at_the_end_are_whole_and_as_one_rank_writes_them(tmp_path):
    # full fine-tuning of o_proj exports the merged model: the partitioned base is gathered for it
    raw = {**tiny_recipe(tmp_path, federation={"rounds": 1, "num_clients": 2, "clients_per_round": 2},
                         client={"per_device_train_batch_size": 4}), "adapter": {"name": "full", "trainable": "o_proj"}}
    path = tmp_path / "full.yaml"
    path.write_text(yaml.safe_dump(raw))
    one_dir = run_recipe(str(path), ["output.name=one"])
    run_dir = launch(path, 2, "zero3", "federation.group_size=2", "federation.group_parallel=zero3",
                     "client.per_device_train_batch_size=2")
    merged, expected = (load_file(str(d / "final" / "model.safetensors")) for d in (run_dir, one_dir))
    assert merged.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(merged[k], expected[k], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@needs_deepspeed
def test_dp_sgd_with_its_per_example_loop_in_a_zero3_group_trains_as_one_rank(dp_sgd_runs):  # noqa: F811
    dp_sgd_in_a_group(dp_sgd_runs, "loop", "zero3")


def test_dp_sgd_through_torch_func_is_refused_in_a_zero3_group_at_load(tmp_path, monkeypatch):
    # measured: the vmap path dies with SIGSEGV on both ranks inside DeepSpeed's hooks
    from fedllm.capabilities import check_pairings
    from fedllm.recipe import Recipe

    real = importlib.util.find_spec  # as if DeepSpeed were installed
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "deepspeed" else real(name, *a))

    recipe = Recipe.model_validate(tiny_recipe(tmp_path, federation={"group_size": 2, "group_parallel": "zero3"},
                                               strategy={"name": "dp_sgd"}, privacy={"noise_multiplier": 1.0}))
    with pytest.raises(RecipeError, match="through torch.func, which crashes inside DeepSpeed ZeRO-3"):
        check_pairings(recipe)
    check_pairings(recipe.model_copy(update={"strategy": {"name": "dp_sgd", "per_example": "loop"}}))


@pytest.mark.parametrize("model, problem", [
    ({"device_map": "auto"}, "model.device_map is not combined with DeepSpeed ZeRO-3"),
    ({"quantization": "4bit"}, "model.quantization=4bit is not combined with DeepSpeed ZeRO-3"),
])
def test_placement_and_quantized_bases_are_refused_in_a_zero3_group_at_load(tmp_path, monkeypatch, model, problem):
    from fedllm.capabilities import check_pairings
    from fedllm.recipe import Recipe

    real = importlib.util.find_spec  # as if DeepSpeed were installed
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "deepspeed" else real(name, *a))
    recipe = Recipe.model_validate(tiny_recipe(tmp_path, federation={"group_size": 2, "group_parallel": "zero3"},
                                               model=model))
    with pytest.raises(RecipeError, match=problem):
        check_pairings(recipe)


def test_zero3_without_deepspeed_installed_is_a_one_line_error_at_load(tmp_path, monkeypatch):
    from fedllm.capabilities import check_pairings
    from fedllm.recipe import Recipe

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    recipe = Recipe.model_validate(tiny_recipe(tmp_path, federation={"group_size": 2, "group_parallel": "zero3"}))
    with pytest.raises(RecipeError, match="group_parallel=zero3 needs DeepSpeed, which is not installed"):
        check_pairings(recipe)

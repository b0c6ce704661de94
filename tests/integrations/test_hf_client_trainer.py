"""`client.trainer: hf`: a transformers.Trainer runs each simulated client's local round and
gives the built-in loop's result (same batches, optimizer, hook and clipping order)."""
import pytest
import torch
from safetensors.torch import load_file

from fedllm.engine import run_recipe


def final_adapter(recipe_file, trainer: str, sections: dict) -> dict:
    client = {"trainer": trainer, **sections.get("client", {})}
    rest = {k: v for k, v in sections.items() if k != "client"}
    path = recipe_file(client=client, output={"name": trainer}, eval={"every": 0}, federation={"rounds": 2}, **rest)
    return load_file(str(run_recipe(str(path)) / "final" / "adapter_model.safetensors"))


def test_the_hf_trainer_client_gives_the_builtin_loop_result(recipe_file):
    # a gradient hook (FedProx) clipped after it, AdamW moments kept per client, accumulation
    sections = {"strategy": {"name": "fedprox", "mu": 0.5},
                "client": {"keep_optimizer_state": True, "gradient_accumulation_steps": 2, "max_grad_norm": 0.05}}
    builtin, hf = final_adapter(recipe_file, "builtin", sections), final_adapter(recipe_file, "hf", sections)
    assert builtin.keys() == hf.keys()
    assert max(t.abs().max().item() for k, t in builtin.items() if "lora_B" in k) > 1e-4  # B starts at 0: it trained
    for k in builtin:
        torch.testing.assert_close(hf[k], builtin[k], rtol=1e-5, atol=1e-7)


def test_the_hf_trainer_client_is_a_recipe_option(recipe_file):
    from fedllm.recipe import RecipeError, load_recipe

    assert load_recipe(recipe_file(client={"trainer": "hf"})).client.trainer == "hf"
    with pytest.raises(RecipeError, match="trainer"):
        load_recipe(recipe_file(client={"trainer": "deepspeed"}))

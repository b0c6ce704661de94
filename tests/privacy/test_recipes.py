"""The privacy and compression recipes validate and describe the settings they claim."""
from pathlib import Path

from fedllm.recipe import load_recipe

RECIPES = Path(__file__).parents[2] / "recipes"


def test_ffa_lora_dp_is_the_papers_shape():
    r = load_recipe(RECIPES / "ffa_lora_dp.yaml")
    assert r.adapter["name"] == "ffa_lora" and r.strategy["name"] == "dp_sgd"
    assert r.federation.num_clients == 3 and r.federation.sampled_per_round() == 3  # all participate
    assert r.privacy.delta == 1e-5 and r.privacy.target_epsilon in (6.0, 3.0, 1.0)
    assert r.privacy.noise_seed is None  # secret noise
    assert r.client.max_grad_norm is None  # the DP-SGD step is clipped per example already
    assert load_recipe(RECIPES / "ffa_lora_dp.yaml", ["privacy.target_epsilon=1"]).privacy.target_epsilon == 1.0


def test_dp_fedavg_dp_brem_and_fedzip_recipes_validate():
    dp = load_recipe(RECIPES / "dp_fedavg.yaml")
    assert dp.strategy["name"] == "dp_fedavg" and dp.strategy["inner"] == {"name": "fedavg"}
    assert (dp.privacy.target_epsilon, dp.privacy.max_epsilon) == (8.0, 8.0) and "target_epsilon" not in dp.strategy
    brem = load_recipe(RECIPES / "dp_brem.yaml")
    assert brem.strategy["name"] == "dp_brem" and brem.privacy.target_epsilon == 8.0
    assert [c["name"] for c in load_recipe(RECIPES / "fedzip.yaml").codecs] == ["fedzip"]

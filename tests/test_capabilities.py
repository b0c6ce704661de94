"""Plugin pairings that cannot run fail when the recipe loads — one line naming both
plugins and what to change, exit code 2, before any model is built."""
import pytest
import yaml

import fedllm.base_layout
from fedllm.capabilities import check_pairings
from fedllm.cli import main
from fedllm.recipe import recipe_from_dict
from fedllm.registry import STRATEGIES
from fedllm.training import CAPABILITIES
from tests.conftest import tiny_recipe

SFPROMPT = {"name": "sfprompt", "num_virtual_tokens": 4, "head_layers": 1, "tail_layers": 0}


def write(tmp_path, adapter=None, **sections):
    raw = tiny_recipe(tmp_path, **sections)
    if adapter is not None:
        raw["adapter"] = adapter
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the pairing was checked")

    monkeypatch.setattr(fedllm.base_layout, "build_model", refuse)


@pytest.mark.parametrize("case, fragments", [
    ({"adapter": SFPROMPT, "strategy": {"name": "dp_sgd"}, "privacy": {"noise_multiplier": 1.0}},
     ["strategy 'dp_sgd'", "sfprompt", "per_example"]),
    ({"strategy": {"name": "dp_sgd"}, "privacy": {"noise_multiplier": 1.0}, "client": {"trainer": "hf"}},
     ["strategy 'dp_sgd'", "client.trainer=hf", "client.trainer=builtin"]),
    ({"adapter": SFPROMPT, "strategy": {"name": "fedspeed"}}, ["strategy 'fedspeed'", "sfprompt", "regrad"]),
    ({"adapter": SFPROMPT, "strategy": {"name": "fedamd"}}, ["strategy 'fedamd'", "sfprompt", "full_gradient"]),
    ({"strategy": {"name": "dp_brem"}, "privacy": {"noise_multiplier": 1.0}, "client": {"trainer": "hf"}},
     ["strategy 'dp_brem'", "client.trainer=hf", "per_example"]),
    ({"strategy": {"name": "krum", "f": 2}, "federation": {"clients_per_round": 3}}, ["clients_per_round=3"]),
    ({"strategy": {"name": "fedamd"}, "codecs": [{"name": "rqm", "clip": 0.1}]}, ["strategy 'fedamd'", "codec 'rqm'"]),
    ({"strategy": {"name": "dp_fedavg", "inner": {"name": "fedamd"}}, "privacy": {"noise_multiplier": 1.0}},
     ["dp_fedavg", "'fedamd'"]),
])
def test_an_impossible_pairing_fails_at_validation_with_both_names(tmp_path, capsys, no_model, case, fragments):
    assert main(["run", str(write(tmp_path, **case))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedllm: error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


@pytest.mark.parametrize("case", [
    {"strategy": {"name": "fedspeed"}, "client": {"trainer": "hf"}},  # the Trainer replays the batch for regrad
    {"strategy": {"name": "fedamd"}, "client": {"trainer": "hf"}},
    {"adapter": SFPROMPT, "strategy": {"name": "fedprox"}},  # a data-free correction works in the split loop
    {"adapter": SFPROMPT, "strategy": {"name": "scaffold"}},
    {"strategy": {"name": "fedamd"}, "codecs": [{"name": "qsgd"}]},  # quantizers give 0/1 flags back exactly
    {"strategy": {"name": "scaffold"}, "codecs": [{"name": "rqm", "clip": 0.1}]},  # nothing counted in its extras
])
def test_pairings_that_can_run_pass(tmp_path, case):
    check_pairings(recipe_from_dict(yaml.safe_load(write(tmp_path, **case).read_text())))


def test_every_declared_need_is_a_known_capability():
    for name in STRATEGIES.names():
        assert STRATEGIES.build({"name": name}).client_needs <= set(CAPABILITIES), name


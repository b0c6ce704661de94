"""reports.check_train_report alone: every number of a party's train reply is of the right type
and in range of what the server knows of that party, and its weight is the one the simulation
would give it (through the deployed server: tests/deploy/test_server_app.py)."""
import json
import math

import pytest

from fedllm.deploy.reports import TrainLimits, check_train_report

LIMITS = TrainLimits(num_samples=30, steps=8, split_bytes_per_step=1000, uniform_weights=False)
HONEST = {"weight": 30.0, "num_samples": 30, "train_loss": 2.5, "steps": 2, "split_bytes_up": 0, "split_bytes_down": 0}


def test_an_honest_report_passes_with_the_weight_of_its_sample_count():
    assert check_train_report(HONEST, LIMITS) == HONEST
    kept = {**HONEST, "num_samples": 12, "weight": 12.0}  # SFPrompt weighs the examples it kept
    assert check_train_report(kept, LIMITS)["weight"] == 12.0
    uniform = TrainLimits(30, 8, 1000, uniform_weights=True)
    assert check_train_report({**HONEST, "weight": 1.0}, uniform)["weight"] == 1.0


@pytest.mark.parametrize("weight", [1e300, 1.7e308, 10**400, 3, 0.5])
def test_the_reported_weight_is_never_used_the_server_recomputes_it(weight):
    assert check_train_report({**HONEST, "weight": weight}, LIMITS)["weight"] == 30.0
    assert check_train_report({**HONEST, "weight": weight}, TrainLimits(30, 8, 1000, True))["weight"] == 1.0


@pytest.mark.parametrize("field, value, why", [
    ("weight", math.inf, "its weight inf is not a finite number > 0"),
    ("weight", 0, "its weight 0 is not a finite number > 0"),
    ("weight", "30", "its weight '30' is not a finite number > 0"),
    ("weight", None, "its weight None is not"),
    ("num_samples", math.nan, "its num_samples nan is not a whole number from 1 to 30"),
    ("num_samples", 31, "its num_samples 31 is not a whole number from 1 to 30"),  # more than its reported size
    ("num_samples", 30.0, "its num_samples 30.0 is not a whole number"),
    ("num_samples", True, "its num_samples True is not a whole number"),
    ("steps", math.inf, "its steps inf is not a whole number from 0 to 8"),
    ("steps", 9, "its steps 9 is not a whole number from 0 to 8"),
    ("steps", -1, "its steps -1 is not"),
    ("train_loss", math.nan, "its train_loss nan is not a finite number >= 0"),
    ("train_loss", -0.5, "its train_loss -0.5 is not a finite number >= 0"),
    ("train_loss", -math.inf, "its train_loss -inf is not"),
    ("split_bytes_up", 2001, "its split_bytes_up 2001 is not a whole number from 0 to 2,000"),  # 2 steps × 1000
    ("split_bytes_down", math.nan, "its split_bytes_down nan is not"),
    ("split_bytes_down", 10**30, "its split_bytes_down 1000000000000000000000000000000 is not"),
])
def test_a_number_a_party_cannot_have_refuses_the_reply_naming_the_field(field, value, why):
    got = check_train_report({**HONEST, field: value}, LIMITS)
    assert isinstance(got, str) and got.startswith(why), got


def test_numbers_as_json_parses_them_and_a_round_without_steps_has_no_loss():
    forged = json.loads(json.dumps({**HONEST, "steps": math.inf}))  # "Infinity" on the wire
    assert check_train_report(forged, LIMITS).startswith("its steps inf")
    idle = check_train_report({**HONEST, "steps": 0, "train_loss": math.nan}, LIMITS)  # FedAMD's anchors: NaN loss
    assert idle["train_loss"] == 0.0 and idle["steps"] == 0
    assert check_train_report({**HONEST, "steps": 0, "split_bytes_up": 1}, LIMITS).startswith("its split_bytes_up 1")
    plain = {k: v for k, v in HONEST.items() if not k.startswith("split")}  # a plain loop exchanged nothing
    assert check_train_report(plain, LIMITS)["split_bytes_up"] == 0

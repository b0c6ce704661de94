"""Where a rank's base lives (fedllm.base_layout): one decision from the recipe and the rank's
client group, checked on a table of recipes; and a lone rank's build is build_model's."""
import pytest
import torch

from fedllm.base_layout import BaseLayout, base_layout, build_for_group
from fedllm.distributed import ClientGroup
from fedllm.models import build_model
from fedllm.recipe import recipe_from_dict

ALONE = ClientGroup(size=1, index=0, count=1, member=0)
LEADER = ClientGroup(size=2, index=0, count=1, member=0)  # the handle is never touched by the decision
MEMBER = ClientGroup(size=2, index=0, count=1, member=1)
FERRET = {"name": "ferret"}  # reads base weights at attach (trains_through_offload = False)


def layout(split=None, from_leader=False, empty=False, partition_while_built=False, placed=False,
           gather_for_merge=False) -> BaseLayout:
    return BaseLayout(split, from_leader, empty, partition_while_built, placed, gather_for_merge)


CASES = [  # (id, recipe sections, group, decision)
    ("one rank", {}, ALONE, layout()),
    ("ddp group", {"federation": {"group_size": 2}}, MEMBER, layout()),
    ("fsdp on one rank is no split", {"federation": {"group_parallel": "fsdp"}}, ALONE, layout()),
    ("fsdp leader load, leader", {"federation": {"group_size": 2, "group_parallel": "fsdp"}}, LEADER,
     layout("fsdp", from_leader=True)),
    ("fsdp leader load, member", {"federation": {"group_size": 2, "group_parallel": "fsdp"}}, MEMBER,
     layout("fsdp", from_leader=True, empty=True)),
    ("fsdp every rank loads", {"federation": {"group_size": 2, "group_parallel": "fsdp", "fsdp_load": "every_rank"}},
     MEMBER, layout("fsdp")),
    ("zero3", {"federation": {"group_size": 2, "group_parallel": "zero3"}}, MEMBER,
     layout("zero3", partition_while_built=True, gather_for_merge=True)),
    ("zero3, an adapter reading the base at attach", {"federation": {"group_size": 2, "group_parallel": "zero3"},
                                                      "adapter": FERRET}, LEADER, layout("zero3", gather_for_merge=True)),
    ("device_map", {"model": {"device_map": "auto", "max_memory": {"cpu": "1GB"}}}, ALONE, layout(placed=True)),
    ("4bit checkpoint", {"model": {"name": "some/checkpoint", "quantization": "4bit"}}, ALONE, layout(placed=True)),
    ("4bit, fsdp every rank", {"model": {"name": "some/checkpoint", "quantization": "4bit"},
                               "federation": {"group_size": 2, "group_parallel": "fsdp", "fsdp_load": "every_rank"}},
     LEADER, layout("fsdp", placed=True)),
]


@pytest.mark.parametrize("sections, group, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_the_decision_for_each_recipe(sections, group, expected):
    recipe = recipe_from_dict(sections)
    assert base_layout(recipe, group) == expected


def test_only_a_leader_filled_base_is_built_off_the_device():
    device = torch.device("cpu")
    assert layout("fsdp", from_leader=True).build_device(device) is None
    assert layout("zero3").build_device(device) == device
    assert layout().build_device(device) == device


def test_a_lone_rank_builds_what_build_model_builds():
    recipe = recipe_from_dict({"adapter": {"name": "lora", "r": 4, "target_modules": ["q_proj"]}})
    _, built, adapter = build_for_group(recipe, ALONE, torch.device("cpu"))
    _, whole, _ = build_model(recipe, torch.device("cpu"))
    expected = whole.state_dict()
    assert built.state_dict().keys() == expected.keys()
    assert all(t.equal(expected[k]) for k, t in built.state_dict().items())
    assert adapter.trainable(built).keys() == adapter.trainable(whole).keys()

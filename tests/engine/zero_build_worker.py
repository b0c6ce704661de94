"""One rank of a DeepSpeed ZeRO-3 client group building its base (fedllm.base_layout.build_for_group),
launched by torch.distributed.run; used by tests/engine/test_zero_build.py.

    zero_build_worker.py OUT BIG RECIPE...   the peak RSS while this rank builds BIG's base; then
                                             for BIG and each RECIPE: whether the base was
                                             partitioned while built, and each weight (gathered)
                                             and the adapter against a whole build on one rank

OUT gets one JSON file per rank (OUT/rank<N>.json)."""
import gc
import json
import sys
from pathlib import Path

import torch

import fedllm.base_layout
from fedllm.base_layout import build_for_group, resident_bytes
from fedllm.distributed import client_groups, process_state
from fedllm.models import build_model
from fedllm.recipe import load_recipe
from meta_load_worker import reset_peak, status_kib  # beside this script: its folder is on sys.path


def partitioned_at_build(recipe, group, device) -> tuple:
    """(the group's rank 0 held this many parameter bytes when build_model returned, of this many
    whole): build_for_group, with the base's ZeRO-3 state read before partition_base runs."""
    seen = {}
    real = fedllm.base_layout.build_model

    def spy(*args, **kwargs):
        tokenizer, model, adapter = real(*args, **kwargs)
        seen["held"], seen["whole"] = resident_bytes(model), whole_bytes(model)
        return tokenizer, model, adapter

    fedllm.base_layout.build_model = spy
    try:
        built = build_for_group(recipe, group, device)
    finally:
        fedllm.base_layout.build_model = real
    return built, seen["held"], seen["whole"]


def whole_bytes(model) -> int:
    return sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in model.parameters())


def differences(model, adapter, recipe, device) -> dict:
    """The largest |difference| between each weight (gathered: collective) and a whole build's,
    and whether every adapter tensor is held whole."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from fedllm.zero import held_whole

    _, whole, _ = build_model(recipe, device)
    reference = dict(whole.named_parameters())
    diffs = {}
    for name, p in model.named_parameters():
        released = getattr(p, "ds_status", None) == ZeroParamStatus.NOT_AVAILABLE  # the adapter is held whole
        with deepspeed.zero.GatheredParameters([p], enabled=released):
            diffs[name] = (p.detach().double() - reference[name].detach().double()).abs().max().item()
    buffers = dict(whole.named_buffers())
    for name, b in model.named_buffers():
        diffs[name] = (b.double() - buffers[name].double()).abs().max().item() if b.numel() else 0.0
    base, whole_base = model.get_base_model(), whole.get_base_model()
    tied = whole_base.get_output_embeddings().weight is whole_base.get_input_embeddings().weight
    return {"max_abs_diff": max(diffs.values()), "worst": max(diffs, key=diffs.get),
            "ties_as_whole": tied == (base.get_output_embeddings().weight is base.get_input_embeddings().weight),
            "adapter_held_whole": held_whole(adapter.trainable(model)), "tensors": len(diffs)}


def check(recipes, group, device, skip: str) -> dict:
    out = {}
    for path, recipe in recipes.items():
        if path == skip:  # `memory` checked it
            continue
        (_, model, adapter), held, whole = partitioned_at_build(recipe, group, device)
        out[path] = {"built_held_bytes": held, "whole_bytes": whole, **differences(model, adapter, recipe, device)}
    return out


def memory(recipe, group, device) -> dict:
    build_model(recipe, empty=True)  # imports the model's and the adapter's modules outside the measure
    tiny = recipe.model_copy(update={"model": recipe.model.model_copy(update={"name": "tiny-llama"}),
                                     "adapter": {"name": "lora", "r": 4, "target_modules": ["q_proj"]}})
    build_for_group(tiny, group, device)  # likewise DeepSpeed's, and its collectives' first use
    gc.collect()
    reset_peak()
    before = status_kib("VmRSS")
    (_, model, adapter), held, whole = partitioned_at_build(recipe, group, device)
    out = {"rss_before_kib": before, "peak_kib": status_kib("VmHWM"), "whole_parameter_bytes": whole_bytes(model),
           "held_parameter_bytes": resident_bytes(model), "built_held_bytes": held, "whole_bytes": whole}
    return out | differences(model, adapter, recipe, device)


def main(out: str, big: str, *paths: str) -> None:
    state = process_state()
    recipes = {path: load_recipe(path) for path in (big, *paths)}
    group = client_groups(recipes[big].federation.group_size)
    torch.manual_seed(1234 + state.process_index)  # a rank's global RNG must not matter
    result = {"memory": memory(recipes[big], group, state.device), **check(recipes, group, state.device, skip=big)}
    result |= {"rank": state.process_index, "leader": group.leader, "group": group.index}
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"rank{state.process_index}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])

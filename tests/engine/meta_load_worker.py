"""One rank of a client group loading its base (fedllm.base_layout.build_for_group), launched by
torch.distributed.run; used by tests/engine/test_meta_groups.py and bench/meta_load.py.

    meta_load_worker.py memory OUT RECIPE        peak RSS while this rank loads RECIPE's base
    meta_load_worker.py check OUT RECIPE...      each rank's shards, adapter and buffers after
                                                 loading, against the slices of a whole load
    meta_load_worker.py checkpoint DIR HIDDEN INTERMEDIATE LAYERS
                                                 (one process) a random Llama checkpoint with
                                                 the byte tokenizer, loadable as model.name

OUT gets one JSON file per rank (OUT/rank<N>.json)."""
import gc
import json
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from fedllm.base_layout import build_for_group
from fedllm.distributed import client_groups, process_state
from fedllm.models import INIT_RANGE, build_model, byte_tokenizer
from fedllm.recipe import load_recipe


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> None:
    """From here on VmHWM (peak resident memory) counts from the current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def parameter_bytes(model) -> tuple[int, int]:
    """(bytes of the whole model's parameters, bytes this rank holds)."""
    whole = held = 0
    for p in model.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        whole += p.numel() * p.element_size()
        held += local.numel() * local.element_size()
    return whole, held


def memory(recipes, group, device) -> dict:
    (recipe,) = recipes
    build_model(recipe, empty=True)  # imports the model's and the adapter's modules outside the measure
    gc.collect()
    reset_peak()
    before = status_kib("VmRSS")
    _, model, _ = build_for_group(recipe, group, device)
    whole, held = parameter_bytes(model)
    return {"rss_before_kib": before, "peak_kib": status_kib("VmHWM"), "rss_after_kib": status_kib("VmRSS"),
            "whole_parameter_bytes": whole, "held_parameter_bytes": held}


def differences(model, whole, group) -> dict:
    """Per tensor, the largest |difference| between what this rank holds and the same slice
    of `whole` (-1: shapes or dtypes disagree)."""
    reference = dict(whole.named_parameters(remove_duplicate=False)) | dict(whole.named_buffers(remove_duplicate=False))
    diffs = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        expected = reference[name]
        if isinstance(t, DTensor):
            t = t.to_local()
            rows = -(-expected.shape[0] // group.size)  # FSDP2's Shard(0): torch.chunk into G parts
            expected = expected[group.member * rows : group.member * rows + t.shape[0]]
        if t.shape != expected.shape or t.dtype != expected.dtype:
            diffs[name] = -1.0
        else:
            diffs[name] = (t.detach().double() - expected.detach().double()).abs().max().item() if t.numel() else 0.0
    return diffs


def check(recipes, group, device) -> dict:
    out = {}
    for path, recipe in recipes.items():
        _, model, _ = build_for_group(recipe, group, device)
        _, whole, _ = build_model(recipe, device)
        out[path] = {"sharded": sum(isinstance(p, DTensor) for p in model.parameters()),
                     "max_abs_diff": differences(model, whole, group)}
    return out


def checkpoint(folder: str, hidden: str, intermediate: str, layers: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=int(hidden), intermediate_size=int(intermediate),
                         num_hidden_layers=int(layers), num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=1024, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, tie_word_embeddings=False, initializer_range=INIT_RANGE)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)


def main(what: str, out: str, *paths: str) -> None:
    if what == "checkpoint":
        return checkpoint(out, *paths)
    state = process_state()
    recipes = {path: load_recipe(path) for path in paths}
    group = client_groups(next(iter(recipes.values())).federation.group_size)
    torch.manual_seed(1234 + state.process_index)  # a rank's global RNG must not matter
    result = {"memory": memory, "check": check}[what](recipes if what == "check" else list(recipes.values()), group,
                                                      state.device)
    result |= {"rank": state.process_index, "leader": group.leader, "group": group.index}
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"rank{state.process_index}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])

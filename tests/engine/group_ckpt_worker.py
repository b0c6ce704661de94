"""One rank of a client group (fsdp or zero3, from the recipe) taking one forward and backward
with and without client.gradient_checkpointing; launched by torch.distributed.run, used by
tests/engine/test_group_checkpointing.py.

    group_ckpt_worker.py OUT RECIPE   OUT/rank<N>.json: for each setting, how often each module
                                      inside a decoder block ran its forward, the loss, and the largest |difference|
                                      of the adapter's gradients between the two settings"""
import json
import sys
from pathlib import Path

import torch

from fedllm.base_layout import build_for_group
from fedllm.distributed import client_groups, process_state
from fedllm.recipe import load_recipe


def step(recipe, group, device, checkpointing: bool) -> dict:
    client = recipe.client.model_copy(update={"gradient_checkpointing": checkpointing})
    recipe = recipe.model_copy(update={"client": client})
    _, model, adapter = build_for_group(recipe, group, device)
    base = model.get_base_model()
    blocks = [m for m in model.modules() if type(m).__name__.removeprefix("FSDP") in base._no_split_modules]
    inner = [m for block in blocks for m in block.modules() if m is not block]
    calls = [0]
    # a block's own hooks (FSDP2's) stay outside transformers' checkpoint; those of the modules
    # inside it (DeepSpeed gathers weights there) run again when the backward recomputes the block
    for module in inner:
        module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    model.train()
    ids = torch.arange(2 * 12, device=device).reshape(2, 12) % 50 + 3  # the same batch on every rank
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in adapter.trainable(model).items()}
    return {"calls_per_module": calls[0] / len(inner), "blocks": len(blocks), "loss": loss.item(), "grads": grads}


def main(out: str, path: str) -> None:
    state = process_state()
    recipe = load_recipe(path)
    group = client_groups(recipe.federation.group_size)
    plain, ckpt = (step(recipe, group, state.device, on) for on in (False, True))
    diff = max((ckpt["grads"][k].double() - g.double()).abs().max().item() for k, g in plain["grads"].items())
    largest = max(g.abs().max().item() for g in plain["grads"].values())
    result = {"rank": state.process_index, "grad_max_abs_diff": diff, "grad_max_abs": largest}
    for name, r in (("plain", plain), ("ckpt", ckpt)):
        result |= {f"{name}_{k}": v for k, v in r.items() if k != "grads"}
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"rank{state.process_index}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])

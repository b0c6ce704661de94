"""LoRA and FFA-LoRA on the tiny preset: what is trained, what travels, exact aggregation."""
import json
import subprocess
import sys

import pytest
import torch
from peft.tuners.lora import LoraLayer

from fedllm.collectors import WeightedSum
from fedllm.models import byte_tokenizer, load_model
from fedllm.recipe import ModelConfig
from fedllm.registry import ADAPTERS
from fedllm.wire import WireContext, serialize

SQUARE = ["q_proj", "o_proj"]  # d_in = d_out, where FFA-LoRA's B is exactly half of A+B


def attached(spec, seed=0):
    tok = byte_tokenizer()
    adapter = ADAPTERS.build(spec)
    return adapter, adapter.attach(load_model(ModelConfig(name="tiny-llama"), tok, seed=0), seed)


def random_update(adapter, model, gen):
    return {k: 0.01 * torch.randn(p.shape, generator=gen) for k, p in adapter.trainable(model).items()}


def test_lora_trains_and_sends_a_and_b():
    adapter, model = attached({"name": "lora", "r": 4, "target_modules": SQUARE})
    names = list(adapter.trainable(model))
    assert any(".lora_A." in n for n in names) and any(".lora_B." in n for n in names)
    assert all(".lora_" in n for n in names)


def test_ffa_lora_trains_only_b_and_b_starts_at_zero():
    adapter, model = attached({"name": "ffa_lora", "r": 4, "target_modules": SQUARE})
    trainable = adapter.trainable(model)
    assert trainable and all(".lora_B." in n for n in trainable)
    assert all(float(p.abs().sum()) == 0 for p in trainable.values())
    a = adapter.frozen_a(model)
    assert all(not p.requires_grad and float(p.abs().sum()) > 0 for p in a.values())


def test_ffa_lora_refreezes_a_after_set_adapter():
    adapter, model = attached({"name": "ffa_lora", "r": 4, "target_modules": SQUARE})
    model.set_adapter("default")  # peft turns lora_A gradients back on here
    assert any(p.requires_grad for p in adapter.frozen_a(model).values())
    adapter.prepare_local_round(model)
    assert not any(p.requires_grad for p in adapter.frozen_a(model).values())


def delta_w(model, scale):
    """s·B·A for every LoRA module, the weight-space update the adapter applies."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            out[name] = scale * module.lora_B["default"].weight @ module.lora_A["default"].weight
    return out


@pytest.mark.parametrize("name,exact", [("ffa_lora", True), ("lora", False)])
def test_aggregated_update_is_the_mean_of_client_updates_only_for_ffa_lora(name, exact):
    adapter, model = attached({"name": name, "r": 4, "alpha": 4.0, "target_modules": SQUARE})
    gen = torch.Generator().manual_seed(1)
    start = adapter.state(model)
    client_states, weights = [], [1.0, 2.0, 5.0]
    total = WeightedSum(start)
    for w in weights:
        upd = random_update(adapter, model, gen)
        client_states.append({k: start[k] + upd[k] for k in start})
        total.add(upd, w)
    per_client = []
    for s in client_states:
        adapter.load(model, s)
        per_client.append(delta_w(model, 1.0))
    mean_delta = {k: sum(w * d[k] for w, d in zip(weights, per_client)) / sum(weights) for k in per_client[0]}
    mean = total.mean()
    adapter.load(model, {k: start[k] + mean[k] for k in start})
    aggregated = delta_w(model, 1.0)
    err = max(float((aggregated[k] - mean_delta[k]).abs().max()) for k in mean_delta)
    size = max(float(mean_delta[k].abs().max()) for k in mean_delta)
    if exact:
        assert err <= 1e-6 * size
    else:
        assert err > 1e-3 * size  # averaging A and B separately is not the average of B·A


def test_ffa_lora_upload_is_half_of_lora_at_the_same_rank():
    sizes = {}
    for name in ("lora", "ffa_lora"):
        adapter, model = attached({"name": name, "r": 8, "target_modules": SQUARE})
        update = random_update(adapter, model, torch.Generator().manual_seed(0))
        message = adapter.encode(update, WireContext(0, 0, 0))
        sizes[name] = (sum(t.numel() * t.element_size() for t in message.tensors.values()), len(serialize(message)))
    assert sizes["ffa_lora"][0] * 2 == sizes["lora"][0]  # tensor payload: exactly half
    assert sizes["ffa_lora"][1] / sizes["lora"][1] == pytest.approx(0.5, abs=0.02)  # with the safetensors header




def a_checksum_in_fresh_process(burn_global_rng: bool) -> str:
    code = (
        "import torch, json\n"
        f"if {burn_global_rng}: torch.manual_seed(123); torch.randn(1000)\n"
        "from fedllm.models import byte_tokenizer, load_model\n"
        "from fedllm.recipe import ModelConfig\n"
        "from fedllm.registry import ADAPTERS\n"
        "a = ADAPTERS.build({'name': 'ffa_lora', 'r': 4})\n"
        "m = a.attach(load_model(ModelConfig(), byte_tokenizer(), seed=0), seed=7)\n"
        "print(json.dumps(a.metadata(m)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["ffa_lora_A_sha256"]


def test_ffa_lora_a_is_identical_in_two_fresh_processes_whatever_the_global_rng():
    assert a_checksum_in_fresh_process(False) == a_checksum_in_fresh_process(True)


def test_ffa_lora_a_depends_on_the_seed():
    a1, m1 = attached({"name": "ffa_lora", "r": 4}, seed=1)
    a2, m2 = attached({"name": "ffa_lora", "r": 4}, seed=2)
    assert a1.metadata(m1) != a2.metadata(m2)

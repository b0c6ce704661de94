"""The adapter contract, one row per plugin × shared checks (peft's test_custom_models.py
pattern): a new adapter needs only a new row in CASES, and fails here until it has one. Only the public Adapter API and the
engine's run/resume entry points are used, so the checks survive a rewrite of the engine."""
import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fedllm.engine import resume_run, run_recipe
from fedllm.models import byte_tokenizer, load_model
from fedllm.recipe import ModelConfig
from fedllm.registry import ADAPTERS
from fedllm.wire import WireContext, deserialize, serialize

from tests.conftest import tiny_recipe

TARGETS = ["q_proj", "v_proj"]
# adapter: the plugin's own options, small enough for a CPU; random_init: attach draws
# something from the seed (a different seed gives a different model); lossless: decode
# gives the encoded update back bit for bit (else decoding the wire bytes must equal
# decoding the in-memory message).
CASES = [
    ("lora", {"adapter": {"name": "lora", "r": 2, "alpha": 4, "dropout": 0.0, "target_modules": TARGETS},
              "random_init": True, "lossless": True}),
    ("ffa_lora", {"adapter": {"name": "ffa_lora", "r": 2, "alpha": 4, "dropout": 0.0, "target_modules": TARGETS},
                  "random_init": True, "lossless": True}),
    ("wara", {"adapter": {"name": "wara", "r": 2, "alpha": 4, "wavelet": "db2", "dropout": 0.0, "target_modules": TARGETS},
              "random_init": True, "lossless": True}),
    ("ferret", {"adapter": {"name": "ferret", "k": 2}, "random_init": False, "lossless": False}),
    ("sfprompt", {"adapter": {"name": "sfprompt", "num_virtual_tokens": 4, "head_layers": 1, "tail_layers": 0,
                              "keep_ratio": 0.5, "local_loss_steps": 1, "split_steps": 2},
                  "random_init": True, "lossless": True}),
    ("full", {"adapter": {"name": "full"}, "random_init": False, "lossless": True}),
    # client 2 (the wire checks') has the full rank; the resume run mixes ranks 2 and 1
    ("hetero_lora", {"adapter": {"name": "hetero_lora", "r": 2, "alpha": 4, "dropout": 0.0, "target_modules": TARGETS,
                                 "ranks": [2, 1], "aggregation": "flexlora"}, "random_init": True, "lossless": True}),
]
rows = pytest.mark.parametrize("name,row", CASES, ids=[c[0] for c in CASES])
IDS = torch.tensor([[60, 1, 35, 72, 101, 108, 108, 111, 33, 2], [1, 70, 101, 100, 32, 76, 76, 77, 46, 2]])


@pytest.fixture(scope="module")
def base():
    return load_model(ModelConfig(name="tiny-llama"), byte_tokenizer(), seed=0)


def build(base, row, seed=0):
    adapter = ADAPTERS.build(row["adapter"])
    return adapter, adapter.attach(copy.deepcopy(base), seed)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def noise(state, seed, scale=0.01):
    gen = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(t.shape, generator=gen).to(t.dtype) for k, t in state.items()}


def plus(state, delta):
    return {k: state[k] + delta[k] for k in state}


def test_every_registered_adapter_has_a_row():
    assert all(name == row["adapter"]["name"] for name, row in CASES)
    assert sorted(name for name, _ in CASES) == ADAPTERS.names()


@rows
def test_attach_is_a_pure_function_of_the_seed(base, name, row):
    torch.manual_seed(1)  # a differently used global RNG must not matter
    a1, m1 = build(base, row, seed=3)
    torch.manual_seed(2)
    torch.rand(5)
    a2, m2 = build(base, row, seed=3)
    assert same(a1.state(m1), a2.state(m2)) and a1.state(m1)
    assert same(m1.state_dict(), m2.state_dict())  # frozen seeded tensors too (FFA-LoRA's A)
    _, m3 = build(base, row, seed=4)
    assert (not same(m1.state_dict(), m3.state_dict())) == row["random_init"]


@rows
def test_state_and_load_round_trip_exactly(base, name, row):
    adapter, model = build(base, row)
    start = adapter.state(model)
    kept = {k: t.clone() for k, t in start.items()}
    adapter.load(model, start)
    assert same(adapter.state(model), kept)
    moved = plus(start, noise(start, 1))
    adapter.load(model, moved)
    assert same(adapter.state(model), moved)
    assert same(start, kept)  # state() is a snapshot, not a view of the live tensors
    adapter.load(model, kept)
    assert same(adapter.state(model), kept)


@rows
def test_a_state_of_the_wrong_shape_is_refused_not_broadcast(base, name, row):
    adapter, model = build(base, row)
    kept = adapter.state(model)
    key = next(k for k, t in kept.items() if t.dim() >= 1 and t.shape[0] > 1)
    wrong = {**kept, key: kept[key][:1].clone()}  # [1, ...] would broadcast into [n, ...]
    with pytest.raises(ValueError, match=f"{key} has shape"):
        adapter.load(model, wrong)
    assert same(adapter.state(model), kept)


@rows
def test_an_update_survives_the_real_wire(base, name, row):
    client, model = build(base, row)
    server, _ = build(base, row)  # its own instance: decoding may use only the bytes
    update = noise(client.state(model), 2)
    ctx = WireContext(round=1, client_id=2, seed=0)
    message = client.encode(update, ctx)
    decoded = server.decode(deserialize(serialize(message)), WireContext(1, 2, 0))
    expected = update if row["lossless"] else client.decode(message, ctx)
    assert same(decoded, expected)
    assert any(float(t.abs().sum()) > 0 for t in decoded.values())


@rows
def test_the_global_state_survives_the_real_wire(base, name, row):
    adapter, model = build(base, row)
    server, _ = build(base, row)
    state = plus(adapter.state(model), noise(adapter.state(model), 3))
    assert same(server.decode_global(deserialize(serialize(adapter.encode_global(state)))), state)


# ---- export -> a fresh process -> the same logits ----------------------------------------
FRESH = r"""
import json, sys, traceback
from pathlib import Path
import torch
import fedllm.adapters  # a plugin may register its peft type at import: that is its loader
from fedllm.models import byte_tokenizer, load_model
from fedllm.recipe import ModelConfig
from peft import PeftModel
from transformers import AutoModelForCausalLM
for out in map(Path, sys.argv[1:]):
    try:
        fmt = (out / "format").read_text()
        if fmt == "peft":
            model = PeftModel.from_pretrained(load_model(ModelConfig(name="tiny-llama"), byte_tokenizer(), seed=0), str(out / "export"))
        else:
            model = AutoModelForCausalLM.from_pretrained(str(out / "export"))
        ids = torch.load(out / "ids.pt")
        with torch.no_grad():
            torch.save(model.eval()(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, out / "fresh.pt")
    except Exception:
        (out / "error.txt").write_text(traceback.format_exc())
"""


@pytest.fixture(scope="module")
def exported(base, tmp_path_factory):
    """Every row exported in its own first format, all loaded by ONE fresh process."""
    root, dirs = tmp_path_factory.mktemp("exports"), {}
    for name, row in CASES:
        adapter, model = build(base, row)
        adapter.load(model, plus(adapter.state(model), noise(adapter.state(model), 4, 0.05)))
        out = dirs[name] = root / name
        out.mkdir()
        fmt = adapter.export_formats[0]
        (out / "format").write_text(fmt)
        torch.save(IDS, out / "ids.pt")
        with torch.no_grad():
            torch.save(model.eval()(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits, out / "expected.pt")
        adapter.export(model, str(out / "export"), fmt)
    subprocess.run([sys.executable, "-c", FRESH, *map(str, dirs.values())], check=True, timeout=300)
    return dirs


@rows
def test_export_loads_in_a_fresh_process_with_the_same_logits(base, exported, name, row):
    out = exported[name]
    assert not (out / "error.txt").exists(), (out / "error.txt").read_text()
    expected, fresh = torch.load(out / "expected.pt"), torch.load(out / "fresh.pt")
    fresh = fresh[:, -expected.shape[1]:]  # a prompt adapter's virtual tokens come first
    torch.testing.assert_close(fresh, expected, rtol=0, atol=1e-5)
    with torch.no_grad():
        plain = base.eval()(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits
    assert not torch.allclose(plain, expected, atol=1e-3)  # the export carries a real change


# ---- resume ----------------------------------------------------------------------------
def final_bytes(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run_dir / "final").glob("*.safetensors"))}


@rows
def test_one_round_then_resume_equals_two_rounds_bit_for_bit(tmp_path, name, row):
    recipe = tiny_recipe(tmp_path, data={"max_samples": 40, "max_length": 96}, federation={"rounds": 2, "num_clients": 2},
                         client={"max_steps": 1, "per_device_train_batch_size": 2},
                         eval={"every": 0, "max_batches": 1, "per_device_eval_batch_size": 4})
    recipe["adapter"] = row["adapter"]  # the row's options only, none of the default LoRA ones
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    straight = run_recipe(str(path))
    reference = final_bytes(straight)
    assert reference
    # as if killed during round 2: only round 1's checkpoint is on disk
    cut = tmp_path / "cut"
    shutil.copytree(straight, cut)
    shutil.rmtree(cut / "final")
    for done in (cut / "checkpoints").iterdir():
        if done.name != "round_1":
            shutil.rmtree(done)
    resume_run(str(cut))
    assert final_bytes(cut) == reference
    rounds = [json.loads(line)["round"] for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2]

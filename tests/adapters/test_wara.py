"""WaRA: the layer against ΔW built from PyWavelets' filter matrices, what is trained and
sent, exact aggregation with freeze_a, exports and a federated run on the tiny preset."""
import json
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import pywt
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import fedllm.adapters.wara  # noqa: F401  registers 'wara'
from fedllm.adapters.wara import WaRALinear
from fedllm.adapters.wara.wavelets import analysis, pad_to_even, synthesis, wavelet_filters
from fedllm.collectors import WeightedSum
from fedllm.engine import resume_run, run_recipe
from fedllm.export import export_run
from fedllm.models import build_model
from fedllm.models import byte_tokenizer, load_model
from fedllm.recipe import ModelConfig, load_recipe
from fedllm.registry import ADAPTERS, RecipeError
from fedllm.state import checkpoint_dirs, read_checkpoint
from fedllm.wire import WireContext, serialize

from tests.conftest import tiny_recipe

SQUARE = ["q_proj", "o_proj"]
RECIPES = Path(__file__).parents[2] / "recipes"


def pywt_matrices(wavelet: str, n: int):
    """(L, H), n/2 × n: PyWavelets' periodized DWT of every unit vector, as columns."""
    lo, hi = pywt.dwt(np.eye(n), wavelet, mode="periodization", axis=-1)
    return torch.tensor(lo.T), torch.tensor(hi.T)


def reference_delta_w(layer: WaRALinear, wavelet: str, rule: str) -> torch.Tensor:
    """s·C(L_outᵀ B A L_in + H_outᵀ B A H_in)P in float64, from the filter matrices alone."""
    d_in, d_out = layer.d_in, layer.d_out
    n_in, n_out = d_in + d_in % 2, d_out + d_out % 2
    pad = torch.eye(n_in, d_in, dtype=torch.float64)
    if rule == "edge" and n_in > d_in:
        pad[d_in, d_in - 1] = 1.0
    crop = torch.eye(d_out, n_out, dtype=torch.float64)
    (l_in, h_in), (l_out, h_out) = pywt_matrices(wavelet, n_in), pywt_matrices(wavelet, n_out)
    ba = layer.wara_B.detach().double() @ layer.wara_A.detach().double()
    return layer.scale * crop @ (l_out.T @ ba @ l_in + h_out.T @ ba @ h_in) @ pad


def toy_layer(d_in, d_out, seed=0, **options):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(OrderedDict(proj=torch.nn.Linear(d_in, d_out)))
    adapter = ADAPTERS.build({"name": "wara", "r": 3, "alpha": 6.0, "dropout": 0.0, "target_modules": ["proj"], **options})
    adapter.attach(model, seed)
    with torch.no_grad():
        model.proj.wara_B.normal_()  # B_w = 0 at init would make every check trivial
    return model.proj


@pytest.mark.parametrize(
    "wavelet,d_in,d_out,rule",
    [("haar", 16, 24, "zero"), ("db4", 16, 24, "zero"), ("haar", 13, 9, "zero"), ("db4", 13, 9, "zero"), ("db4", 13, 9, "edge")],
)
def test_layer_output_is_w0x_plus_delta_w_built_from_the_pywavelets_filter_matrices(wavelet, d_in, d_out, rule):
    layer = toy_layer(d_in, d_out, wavelet=wavelet, odd_padding=rule)
    delta_w = reference_delta_w(layer, wavelet, rule)
    x = torch.randn(5, 7, d_in)
    with torch.no_grad():
        expected = layer.base_layer(x).double() + x.double() @ delta_w.T
        torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
        # the export's rank-2r factors carry the same ΔW
        b, a = layer.lora_factors()
        assert b.shape == (d_out, 6) and a.shape == (6, d_in)
        torch.testing.assert_close(layer.scale * b.double() @ a.double(), delta_w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("wavelet", ["haar", "db4", "sym5"])
def test_the_transform_is_pywavelets_periodization_and_reconstructs_perfectly(wavelet):
    filters = wavelet_filters(wavelet).double()
    x = torch.randn(3, 20, dtype=torch.float64)
    lo, hi = pywt.dwt(x.numpy(), wavelet, mode="periodization", axis=-1)
    coeffs = analysis(x, filters)
    np.testing.assert_allclose(coeffs[:, 0].numpy(), lo, atol=1e-6)
    np.testing.assert_allclose(coeffs[:, 1].numpy(), hi, atol=1e-6)
    torch.testing.assert_close(synthesis(coeffs, filters), x, rtol=0, atol=1e-6)
    # `edge` padding of an odd length is PyWavelets' own rule for odd periodization
    odd = x[:, :19]
    lo, hi = pywt.dwt(odd.numpy(), wavelet, mode="periodization", axis=-1)
    np.testing.assert_allclose(analysis(pad_to_even(odd, "edge"), filters)[:, 0].numpy(), lo, atol=1e-6)


@pytest.mark.parametrize("wavelet", ["bior2.2", "dmey", "morl", "haar-ish"])
def test_an_unknown_or_not_exactly_orthogonal_wavelet_is_refused(wavelet):
    with pytest.raises(RecipeError, match="adapter.wavelet"):
        ADAPTERS.build({"name": "wara", "wavelet": wavelet})


def attached(spec, seed=0, dtype="float32"):
    adapter = ADAPTERS.build(spec)
    return adapter, adapter.attach(load_model(ModelConfig(name="tiny-llama", dtype=dtype), byte_tokenizer(), seed=0), seed)


def lm_batch(seed=0):
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def test_delta_w_is_zero_at_init_and_gradients_reach_a_and_b():
    adapter, model = attached({"name": "wara", "r": 4, "wavelet": "db2", "dropout": 0.0, "target_modules": SQUARE})
    base = load_model(ModelConfig(name="tiny-llama"), byte_tokenizer(), seed=0)
    batch = lm_batch()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, base(**batch).logits)
    params = adapter.trainable(model)
    model(**batch).loss.backward()
    assert all(float(p.grad.abs().sum()) > 0 for n, p in params.items() if n.endswith("wara_B"))
    assert all(float(p.grad.abs().sum()) == 0 for n, p in params.items() if n.endswith("wara_A"))  # B_w = 0
    torch.optim.SGD(params.values(), lr=0.1).step()
    model.zero_grad()
    model(**batch).loss.backward()
    assert all(float(p.grad.abs().sum()) > 0 for p in params.values())


def test_the_update_has_rank_2r_so_no_lora_of_rank_r_gives_the_same_output():
    layer = toy_layer(32, 32, wavelet="db2")
    singular = torch.linalg.svdvals(layer.delta_weight().double())
    assert int((singular > 1e-6 * singular[0]).sum()) == 2 * 3
    # the best rank-r (LoRA) update misses WaRA's output on random input by a wide margin
    u, s, vh = torch.linalg.svd(layer.delta_weight().double())
    best_rank_r = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
    x = torch.randn(64, 32, dtype=torch.float64)
    with torch.no_grad():
        wara = layer.delta(x.float()).double()
    assert float((x @ best_rank_r.T - wara).norm()) > 0.1 * float(wara.norm())


def upload(adapter, model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    update = {k: 0.01 * torch.randn(p.shape, generator=gen) for k, p in adapter.trainable(model).items()}
    message = adapter.encode(update, WireContext(0, 0, 0))
    return sum(t.numel() * t.element_size() for t in message.tensors.values()), len(serialize(message))


def test_trainable_parameters_and_upload_bytes_are_half_of_lora_at_the_same_rank():
    sizes, params = {}, {}
    for name, extra in (("lora", {}), ("wara", {}), ("wara_frozen_a", {"freeze_a": True})):
        adapter, model = attached({"name": name.removesuffix("_frozen_a"), "r": 8, "target_modules": SQUARE, **extra})
        params[name] = sum(p.numel() for p in adapter.trainable(model).values())
        sizes[name] = upload(adapter, model)
    assert params["wara"] * 2 == params["lora"] and params["wara_frozen_a"] * 4 == params["lora"]
    assert sizes["wara"][0] * 2 == sizes["lora"][0]  # tensor payload: exactly half
    assert sizes["wara"][1] / sizes["lora"][1] == pytest.approx(0.5, abs=0.02)  # with the safetensors header
    assert sizes["wara_frozen_a"][0] * 4 == sizes["lora"][0]  # B_w only, on square layers


@pytest.mark.parametrize("freeze_a,exact", [(True, True), (False, False)])
def test_with_freeze_a_the_aggregate_is_exactly_the_mean_of_client_updates(freeze_a, exact):
    adapter, model = attached({"name": "wara", "r": 4, "wavelet": "db2", "target_modules": SQUARE, "freeze_a": freeze_a})
    gen, start, weights = torch.Generator().manual_seed(1), adapter.state(model), [1.0, 2.0, 5.0]
    total, per_client = WeightedSum(start), []
    for w in weights:
        upd = {k: 0.05 * torch.randn(t.shape, generator=gen) for k, t in start.items()}
        total.add(upd, w)
        adapter.load(model, {k: start[k] + upd[k] for k in start})
        per_client.append({n: m.delta_weight() for n, m in adapter.layers(model).items()})
    mean_delta = {k: sum(w * d[k] for w, d in zip(weights, per_client)) / sum(weights) for k in per_client[0]}
    mean = total.mean()
    adapter.load(model, {k: start[k] + mean[k] for k in start})
    err = max(float((m.delta_weight() - mean_delta[n]).abs().max()) for n, m in adapter.layers(model).items())
    size = max(float(d.abs().max()) for d in mean_delta.values())
    assert (err <= 1e-6 * size) if exact else (err > 1e-3 * size)


def test_the_transform_runs_in_fp32_under_bf16():
    adapter, model = attached({"name": "wara", "r": 4, "wavelet": "db2", "target_modules": SQUARE}, dtype="bfloat16")
    layer = next(iter(adapter.layers(model).values()))
    with torch.no_grad():
        layer.wara_B.normal_()
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = layer.delta(x)
    assert under_autocast.dtype == torch.float32 and torch.equal(under_autocast, layer.delta(x))
    loss = model(**lm_batch()).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad.dtype == torch.float32 for p in adapter.trainable(model).values())


# ---- in the engine: one small federated run shared by the tests below -----------------
WARA = {"name": "wara", "r": 4, "alpha": 8, "wavelet": "db2", "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "o_proj"]}


@pytest.fixture(scope="module")
def wara_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wara")
    recipe = tiny_recipe(tmp, adapter=WARA, federation={"rounds": 3}, client={"max_steps": 4, "learning_rate": 0.02})
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_dir = run_recipe(str(path))
    return run_dir, [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_federated_wara_run_lowers_the_eval_loss_and_sends_its_factors(wara_run):
    run_dir, rows = wara_run
    losses = [r["eval_loss"] for r in rows]
    assert losses[-1] < losses[0] - 0.1, losses
    trainable = json.loads((run_dir / "run_meta.json").read_text())["trainable_parameters"]
    ledger = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    assert all(4 * trainable < e["bytes_up"] < 4 * trainable + 8192 for e in ledger)


def engine_model(run_dir):
    recipe = load_recipe(run_dir / "recipe.yaml")
    tokenizer, model, adapter = build_model(recipe)
    adapter.load(model, read_checkpoint(checkpoint_dirs(run_dir)[-1])[0]["global"])
    return recipe, tokenizer, model.eval()


def test_peft_and_merged_exports_reproduce_the_engine_logits(wara_run, tmp_path):
    run_dir, _ = wara_run
    recipe, tokenizer, model = engine_model(run_dir)
    lora = export_run(str(run_dir), str(tmp_path / "peft"))
    config = json.loads((lora / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 * WARA["r"]
    reloaded = PeftModel.from_pretrained(load_model(recipe.model, tokenizer, recipe.seed), str(lora)).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(export_run(str(run_dir), str(tmp_path / "merged"), fmt="merged"))).eval()
    base = load_model(recipe.model, tokenizer, recipe.seed).eval()
    ids = tokenizer(["### Instruction: say hi", "hello"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**ids).logits
        assert not torch.allclose(base(**ids).logits, expected, atol=1e-3)  # the run really changed the model
        torch.testing.assert_close(reloaded(**ids).logits, expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(merged(**ids).logits, expected, rtol=1e-4, atol=1e-5)


def test_gpt2_conv1d_layers_export_to_peft_exactly(tmp_path):
    adapter = ADAPTERS.build({"name": "wara", "r": 2, "wavelet": "sym3", "dropout": 0.0, "target_modules": "all-linear"})
    tokenizer, config = byte_tokenizer(), ModelConfig(name="tiny-gpt2")
    model = adapter.attach(load_model(config, tokenizer, seed=0), seed=0).eval()
    with torch.no_grad():
        for p in adapter.trainable(model).values():
            p.normal_(std=0.1)
    adapter.export(model, str(tmp_path), "peft")
    reloaded = PeftModel.from_pretrained(load_model(config, tokenizer, seed=0), str(tmp_path)).eval()
    ids = tokenizer(["gpt two"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**ids).logits, model(**ids).logits, rtol=1e-4, atol=1e-5)


def test_resume_after_losing_the_last_round_is_bit_exact(wara_run, tmp_path):
    run_dir, _ = wara_run
    crashed = tmp_path / "crashed"
    shutil.copytree(run_dir, crashed)
    shutil.rmtree(checkpoint_dirs(crashed)[-1])  # as if killed during the last round
    shutil.rmtree(crashed / "final")
    resume_run(str(crashed))
    reference = load_file(str(run_dir / "final/adapter_model.safetensors"))
    resumed = load_file(str(crashed / "final/adapter_model.safetensors"))
    assert resumed.keys() == reference.keys() and all(torch.equal(resumed[k], reference[k]) for k in reference)


@pytest.mark.parametrize("name", ["wara_quickstart.yaml", "wara_dolly.yaml"])
def test_the_wara_recipes_validate(name):
    recipe = load_recipe(RECIPES / name)
    assert recipe.adapter["name"] == "wara" and recipe.federation.rounds > 0

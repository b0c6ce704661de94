"""model.device_map: one base split over a rank's devices (accelerate's placement), with
offloaded layers on disk on a CPU-only machine, trains the same adapter as the unsplit base."""
import pytest
import torch
from safetensors.torch import load_file

from fedllm.cli import main
from fedllm.engine import run_recipe
from fedllm.models import build_model, byte_tokenizer, load_model
from fedllm.placement import offloading
from fedllm.recipe import ModelConfig, recipe_from_dict
from fedllm.registry import RecipeError
from tests.conftest import tiny_recipe

# tiny-llama's weights: 535 kB in float32 (66 kB embedding, 200 kB per layer, 66 kB head);
# 300 kB of CPU holds the embedding and nothing else, so both layers and the head go to disk
BUDGET = {"device_map": "auto", "max_memory": {"cpu": "300KB", "disk": "1GB"}}


def recipe(tmp_path, **model):
    return recipe_from_dict(tiny_recipe(tmp_path, model={"name": "tiny-llama", **model}))


def train(model, params, steps=3):
    """A few AdamW steps on fixed token rows; the losses."""
    torch.manual_seed(0)
    rows = torch.randint(3, 259, (2, 24))
    optimizer = torch.optim.AdamW(params.values(), lr=0.02)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=rows, labels=rows).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


LLAMA = ("tiny-llama", "300KB", {"embed_tokens": "cpu", "layers.0.": "disk", "lm_head": "disk"})
GPT2 = ("tiny-gpt2", "500KB", {"wte": "cpu", "lm_head": "cpu", "h.0.": "disk"})  # its head is tied to wte: kept together


@pytest.mark.parametrize("preset, cpu, where", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_a_base_over_its_memory_budget_trains_with_layers_on_disk_and_matches_the_unsplit_adapter(tmp_path, preset, cpu, where):
    target = {"target_modules": None} if preset == "tiny-gpt2" else {}
    raw = lambda **model: recipe_from_dict(tiny_recipe(tmp_path, model={"name": preset, **model}, adapter=target))  # noqa: E731
    _, whole, adapter = build_model(raw())
    _, split, _ = build_model(raw(device_map="auto", max_memory={"cpu": cpu, "disk": "1GB"},
                                  offload_folder=str(tmp_path / "offload")))
    offloaded = {n for n, m in split.named_modules() if offloading(m)}
    for part, place in where.items():  # a module is offloaded exactly when the map put it on disk
        assert any(part in n for n in offloaded) == (place == "disk"), part
    assert all(m.weight.device.type == "meta" for n, m in split.named_modules() if n in offloaded and hasattr(m, "weight"))
    assert (tmp_path / "offload" / "index.json").exists()
    # the adapter is created where its layer executes, with the unsplit model's initial values
    params, reference = adapter.trainable(split), adapter.trainable(whole)
    assert params.keys() == reference.keys() and all(p.device.type == "cpu" for p in params.values())
    assert all(torch.equal(params[k], reference[k]) for k in params)
    assert train(split, params) == train(whole, reference)
    # every B (zero at init) moved: gradients came back through the offloaded layers and head
    assert all(params[k].abs().sum() > 0 for k in params if "lora_B" in k)
    assert all(torch.equal(params[k], reference[k]) for k in params)  # bitwise the unsplit adapter


def weights_held_for_backward(model) -> set:
    """Shapes of the MLP weights (64×176, 176×64) among the tensors a forward saves for backward."""
    shapes = []
    rows = torch.randint(3, 259, (2, 24))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        model(input_ids=rows, labels=rows)
    return {s for s in shapes if s in {(64, 176), (176, 64)}}


@pytest.mark.parametrize("adapter", [
    {"name": "ffa_lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
    {"name": "wara"},  # its own modules, not peft's
    {"name": "full", "trainable": "embed"},  # full-parameter on a layer that stays resident
], ids=lambda a: a["name"])
def test_other_adapters_train_through_the_offloaded_base_to_the_unsplit_result(tmp_path, adapter):
    build = lambda **model: build_model(recipe_from_dict({**tiny_recipe(tmp_path, model=model), "adapter": adapter}))  # noqa: E731
    (_, whole, plugin), (_, split, _) = build(), build(**BUDGET)
    params, reference = plugin.trainable(split), plugin.trainable(whole)
    assert train(split, params) == train(whole, reference)
    assert all(torch.equal(params[k], reference[k]) for k in params)


def test_gradient_checkpointing_reloads_offloaded_layers_for_backward_instead_of_holding_them(tmp_path):
    checkpointing = {"gradient_checkpointing": True, "max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 0.01}
    _, split, adapter = build_model(recipe_from_dict(tiny_recipe(tmp_path, model=BUDGET, client=checkpointing)))
    _, whole, _ = build_model(recipe_from_dict(tiny_recipe(tmp_path, client=checkpointing)))
    _, plain, _ = build_model(recipe(tmp_path, **BUDGET))
    # without checkpointing autograd keeps every loaded layer weight until backward; with it,
    # none: the recomputed forward in backward calls the offload hooks again
    assert weights_held_for_backward(plain) and not weights_held_for_backward(split)
    assert train(split, adapter.trainable(split), 2) == pytest.approx(train(whole, adapter.trainable(whole), 2), abs=1e-6)


def test_an_explicit_map_places_the_named_modules(tmp_path):
    mapping = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
               "model.rotary_emb": "cpu", "lm_head": "cpu"}
    _, split, adapter = build_model(recipe(tmp_path, device_map=mapping))
    offloaded = {n for n, m in split.named_modules() if offloading(m)}
    assert offloaded and all(".layers.1." in n for n in offloaded)
    assert torch.isfinite(torch.tensor(train(split, adapter.trainable(split), 1))).all()


@pytest.mark.parametrize("model, says", [
    ({"device_map": {"model.embed_tokens": "cpu"}}, "map every module"),
    ({"device_map": {"": "gpu"}}, "'gpu' is no device"),
    ({"device_map": {"": 3}}, "GPU 3 does not exist"),
    ({"device_map": "auto", "max_memory": {"cpu": "lots"}}, "'lots' is no size"),
    ({"device_map": "auto", "max_memory": {"cpu": "1KB"}}, "leaves no room for a single block"),
])
def test_a_bad_map_or_a_budget_too_small_is_one_line_naming_the_key(tmp_path, model, says):
    with pytest.raises(RecipeError, match=says) as err:
        build_model(recipe(tmp_path, **model))
    assert "\n" not in str(err.value) and "model." in str(err.value)


def test_a_budget_without_a_map_is_refused_when_the_recipe_loads(tmp_path):
    with pytest.raises(RecipeError, match="set model.device_map too"):
        recipe(tmp_path, max_memory={"cpu": "1GB"})


@pytest.mark.parametrize("adapter, says", [
    ({"name": "sfprompt"}, "adapter.name=sfprompt cannot train through a base placed"),
    ({"name": "ferret"}, "adapter.name=ferret cannot train through a base placed"),
    ({"name": "full", "trainable": "layers"}, "trains base weights that model.device_map offloads"),
])
def test_an_adapter_that_needs_the_base_weights_is_refused_in_one_line(tmp_path, adapter, says):
    raw = tiny_recipe(tmp_path, model=BUDGET)
    raw["adapter"] = adapter
    with pytest.raises(RecipeError, match=says):
        build_model(recipe_from_dict(raw))


def test_a_local_checkpoint_is_placed_by_from_pretrained(tmp_path):
    local = tmp_path / "my-model"
    tok = byte_tokenizer()
    load_model(ModelConfig(), tok, seed=0).save_pretrained(local)
    tok.save_pretrained(local)
    _, whole, adapter = build_model(recipe(tmp_path, name=str(local)))
    _, split, _ = build_model(recipe(tmp_path, name=str(local), **BUDGET))
    assert "disk" in split.get_base_model().hf_device_map.values()
    assert any(offloading(m) for m in split.modules())
    params, reference = adapter.trainable(split), adapter.trainable(whole)
    assert train(split, params) == train(whole, reference)
    assert all(torch.equal(params[k], reference[k]) for k in params)


def test_dp_sgd_per_example_gradients_run_through_the_offloaded_base(tmp_path):
    from fedllm.privacy.dp_sgd import looped_clipped_sum, vectorized_clipped_sum
    from fedllm.training import ModelLoss

    _, split, adapter = build_model(recipe(tmp_path, **BUDGET))
    params = adapter.trainable(split)
    rows = torch.randint(3, 259, (3, 16))
    inputs = {"input_ids": rows, "attention_mask": torch.ones_like(rows), "labels": rows}
    loss_of = ModelLoss(split, torch.autocast("cpu", enabled=False))
    looped, _, _ = looped_clipped_sum(params, inputs, loss_of, clip=0.1)
    vectorized, _, _ = vectorized_clipped_sum(params, inputs, loss_of, clip=0.1)
    assert all(torch.allclose(looped[k], vectorized[k], atol=1e-6) for k in params)
    assert any(looped[k].abs().sum() > 0 for k in params if ".layers.1." in k)


def test_a_round_keeps_one_offloaded_base_for_every_client(tmp_path):
    from fedllm.engine import Federation

    folder = tmp_path / "offload"
    fed = Federation(recipe_from_dict(tiny_recipe(tmp_path, model={**BUDGET, "offload_folder": str(folder)})), tmp_path / "run")
    fed.start()
    on_disk = {f.name: f.stat().st_size for f in folder.iterdir()}
    offloaded = [m for m in fed.model.modules() if offloading(m)]
    fed.run_round(0)
    assert fed.client.model is fed.model and len(fed.participation.sampled(0)) == 2
    # after two clients the offloaded weights are back on "meta", and the disk holds one copy
    assert offloaded and all(p.device.type == "meta" for m in offloaded for p in m.parameters(recurse=False))
    assert {f.name: f.stat().st_size for f in folder.iterdir()} == on_disk


@pytest.mark.slow
def test_a_federation_over_an_offloaded_base_ends_with_the_unsplit_adapter(recipe_file, tmp_path):
    base = run_recipe(str(recipe_file(federation={"rounds": 2}, output={"name": "whole"})))
    split = run_recipe(str(recipe_file(model=BUDGET, federation={"rounds": 2}, output={"name": "split"})))
    a, b = (load_file(d / "final" / "adapter_model.safetensors") for d in (base, split))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # merging the adapter into an offloaded base (fedllm export --to merged) writes the same weights
    for run in (base, split):
        assert main(["export", str(run), "--round", "last", "--to", "merged", str(run / "merged")]) == 0
    a, b = (load_file(d / "merged" / "model.safetensors") for d in (base, split))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_layers_past_its_budget_stay_in_cpu_ram_and_the_adapter_trains_on_the_gpu(tmp_path):
    _, whole, adapter = build_model(recipe(tmp_path), torch.device("cuda", 0))
    split_recipe = recipe(tmp_path, device_map="auto", max_memory={0: "300KB", "cpu": "1GB"})
    _, split, _ = build_model(split_recipe, torch.device("cuda", 0))
    assert "cpu" in split.get_base_model().hf_device_map.values() and any(offloading(m) for m in split.modules())
    params, reference = adapter.trainable(split), adapter.trainable(whole)
    assert all(p.device.type == "cuda" for p in params.values())
    rows = torch.randint(3, 259, (2, 24), device="cuda")
    for model, ps in ((split, params), (whole, reference)):
        optimizer = torch.optim.AdamW(ps.values(), lr=0.02)
        for _ in range(3):
            model(input_ids=rows, labels=rows).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    assert all(torch.allclose(params[k], reference[k], atol=1e-5) for k in params)


@pytest.mark.slow
def test_two_ranks_each_with_an_offloaded_base_end_where_one_unsplit_process_ends(recipe_file, tmp_path):
    from tests.engine.test_distributed import launch_two_processes

    one = load_file(run_recipe(str(recipe_file(federation={"rounds": 2}, output={"name": "one"}))) / "final" / "adapter_model.safetensors")
    folder = tmp_path / "offload"
    launch_two_processes(recipe_file(model={**BUDGET, "offload_folder": str(folder)}, federation={"rounds": 2}), "two")
    two = load_file(tmp_path / "runs" / "two" / "final" / "adapter_model.safetensors")
    assert sorted(p.name for p in folder.iterdir()) == ["rank0", "rank1"]  # each rank its own offloaded copy
    assert one.keys() == two.keys() and all(torch.allclose(one[k], two[k], rtol=1e-5, atol=1e-7) for k in one)

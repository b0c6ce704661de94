"""Ferret (arXiv 2409.06277) and the full-parameter baseline: seeded bases, the estimator,
what travels, and a federation on the tiny preset."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fedllm.adapters.ferret  # noqa: F401  registers "ferret"
import fedllm.adapters.full  # noqa: F401  registers "full"
from fedllm import engine
from fedllm.codecs import seeded
from fedllm.codecs.seeded import generate, truncated_normal_variance
from fedllm.models import byte_tokenizer, load_model
from fedllm.recipe import ModelConfig, load_recipe, recipe_from_dict
from fedllm.registry import ADAPTERS
from fedllm.wire import WireContext, deserialize, serialize
from tests.conftest import tiny_recipe

QUICKSTART = Path(__file__).parents[2] / "recipes" / "ferret_quickstart.yaml"


def toy(spec, in_features=8, out_features=8):
    """A bare Linear (d = out·in + out) is enough for the estimator's math."""
    adapter = ADAPTERS.build({"name": "ferret", "block_rule": "single", **spec})
    return adapter, adapter.attach(torch.nn.Linear(in_features, out_features), seed=0)


def tiny(spec):
    adapter = ADAPTERS.build(spec)
    return adapter, adapter.attach(load_model(ModelConfig(name="tiny-llama"), byte_tokenizer(), seed=0), seed=0)


def random_update(adapter, model, seed=0, scale=0.01):
    gen = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(p.shape, generator=gen) for k, p in adapter.trainable(model).items()}


def roundtrip(adapter, update, ctx):
    wire = serialize(adapter.encode(update, ctx))
    return adapter.decode(deserialize(wire), ctx), len(wire)


def flat(state):
    return torch.cat([state[k].reshape(-1) for k in sorted(state)])


# ---- the bases -------------------------------------------------------------------------
GOLDEN = [-0.00058532, -0.02206706, 0.09578995, -0.06311263, 0.0923549, -0.21030235]  # seed 1234, block 3, d 16


def test_a_basis_is_a_recorded_truncated_normal_vector():
    v = generate([1234], block=3, d=16)[0]
    assert v[:6].tolist() == pytest.approx(GOLDEN, abs=1e-7)
    assert float(v.abs().max()) <= 16**-0.5
    many = generate(list(range(64)), block=0, d=4096)
    assert float(many.abs().max()) <= 4096**-0.5
    assert float(many.var()) == pytest.approx(truncated_normal_variance(4096**-0.5), rel=0.02)  # ≈ 1/(3d)
    assert not torch.equal(generate([1234], 3, 16), generate([1234], 4, 16))  # block enters the seed


def test_two_fresh_processes_regenerate_identical_bases():
    # the module alone (torch only, no peft/transformers import), loaded from its file
    code = (
        "import hashlib, importlib.util, torch; torch.manual_seed(99); torch.rand(7)\n"  # a used global RNG must not matter
        f"spec = importlib.util.spec_from_file_location('seeded', {str(Path(seeded.__file__))!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "print(hashlib.sha256(m.generate([0, 1, 2, 3, 4], 7, 4096).numpy().tobytes()).hexdigest())"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    runs = [p.communicate(timeout=120)[0].strip() for p in procs]
    here = hashlib.sha256(generate([0, 1, 2, 3, 4], 7, 4096).numpy().tobytes()).hexdigest()
    assert runs == [here, here]  # bit for bit


# ---- the estimator ---------------------------------------------------------------------
def mean_reconstruction(adapter, update, trials, round=0):
    """Average of decode(encode(Δ)) over `trials` clients, each with its own seeds."""
    total = None
    for client in range(trials):
        out, _ = roundtrip(adapter, update, WireContext(round, client, seed=0))
        total = flat(out) if total is None else total + flat(out)
    return total / trials


def test_unbiased_reconstruction_error_shrinks_like_one_over_sqrt_trials():
    adapter, model = toy({"k": 8})
    update = random_update(adapter, model)
    target = flat(update)
    error = {t: float((mean_reconstruction(adapter, update, t) - target).norm() / target.norm()) for t in (100, 1600)}
    # one trial's error is ≈ √(d/K) = 3; averaging T independent ones divides it by √T
    assert error[1600] < 0.15
    assert 2.5 < error[100] / error[1600] < 6.5, error


def test_official_scaling_is_biased_by_d_sigma2_times_its_server_lr():
    adapter, model = toy({"k": 8, "scaling": "official", "clip": 1e9})  # no clipping, to see the mean
    update = random_update(adapter, model)
    target = flat(update)
    mean = mean_reconstruction(adapter, update, 800)
    d = target.numel()
    expected = 10.0 * d * truncated_normal_variance(d**-0.5)  # d/M · M · σ² · server lr ≈ 10/3
    assert float(mean @ target / (target @ target)) == pytest.approx(expected, rel=0.1)


def test_orthogonalised_bases_with_k_at_least_d_reconstruct_exactly():
    adapter, model = toy({"k": 24, "orthogonalize": True}, in_features=4, out_features=4)  # d = 20
    update = random_update(adapter, model)
    out, _ = roundtrip(adapter, update, WireContext(0, 0, 0))
    torch.testing.assert_close(flat(out), flat(update), rtol=0, atol=1e-6)
    adapter, model = toy({"k": 12}, in_features=4, out_features=4)  # K < d, plain bases: not exact
    out, _ = roundtrip(adapter, update, WireContext(0, 0, 0))
    assert float((flat(out) - flat(update)).norm()) > 0.1 * float(flat(update).norm())


def test_official_budget_follows_block_norms_and_each_term_is_clipped():
    adapter, model = toy({"k": 8, "scaling": "official", "block_rule": "per_tensor", "clip": 0.05})
    update = random_update(adapter, model)
    update["bias"] *= 0.01  # a block with a tiny norm gets the minimum budget of 2 seeds
    message = adapter.encode(update, WireContext(0, 0, 0))
    assert message.tensors["counts"].tolist() == [8, 2]
    decoded = adapter.decode(deserialize(serialize(message)), WireContext(0, 0, 0))
    # rebuild the weight block independently: −lr · Σ clip(γ_k v_k) over the sent seeds
    seeds = [message.tensors["seeds"][i].item() for i in message.tensors["index"][:8].tolist()]
    terms = message.tensors["coords"][:8, None] * generate(seeds, 0, 64)
    terms *= torch.clamp(0.05 / terms.norm(dim=1, keepdim=True), max=1.0)
    torch.testing.assert_close(decoded["weight"].reshape(-1), -10.0 * terms.sum(0), rtol=1e-5, atol=1e-7)
    assert (terms.norm(dim=1) <= 0.05 + 1e-6).all()


def test_the_message_depends_only_on_the_update_and_the_round():
    one, model = toy({"k": 8, "seed_pool": "per_round"})
    update = random_update(one, model)
    one.encode(random_update(one, model, seed=5), WireContext(3, 0, 0))  # a warm cache of the same round
    torch.manual_seed(1234)  # and a used global RNG
    two, _ = toy({"k": 8, "seed_pool": "per_round"})
    ctx = WireContext(3, 1, 0)
    assert serialize(one.encode(update, ctx)) == serialize(two.encode(update, ctx))
    wide, _ = toy({"k": 8, "seed_pool": "per_round", "dtype": "float64"})
    torch.testing.assert_close(wide.encode(update, ctx).tensors["coords"], one.encode(update, ctx).tensors["coords"], rtol=1e-4, atol=1e-6)


# ---- blocks, bytes and the cost of a round ---------------------------------------------
def test_merge_small_gives_every_large_matrix_its_own_block_and_merges_the_norms():
    adapter, model = tiny({"name": "ferret", "k": 4})
    names = [n for b in adapter.blocks for n in b.names]
    assert names == list(adapter.trainable(model))  # every trainable tensor once, in model order
    merged = [b.names for b in adapter.blocks if len(b.names) > 1]
    assert merged and all(n.endswith("norm.weight") for group in merged for n in group)
    assert len(adapter.blocks) == 18 and all(len(b.names) == 1 for b in adapter.blocks if b.size >= 4096)
    total, _ = tiny({"name": "ferret", "k": 64, "k_per": "total"})
    assert sum(total.ks) == 64 and total.ks[0] > total.ks[1] >= 1  # ∝ block size: embeddings get most


def test_the_upload_is_k_scalars_and_seeds_per_block_and_1000x_smaller_than_the_model():
    recipe = load_recipe(QUICKSTART)
    adapter, model = tiny(recipe.adapter)
    update = random_update(adapter, model)
    full_bytes = sum(t.numel() * t.element_size() for t in update.values())
    k, blocks = recipe.adapter["k"], len(adapter.blocks)
    sizes = {}
    for spec in ({}, {"scaling": "official"}, {"seed_pool": "shared"}):
        adapter, _ = tiny({**recipe.adapter, **spec})
        sizes[json.dumps(spec)] = len(serialize(adapter.encode(update, WireContext(0, 0, 0))))
    print(f"\nferret upload per client per round vs the full update ({full_bytes} B): "
          + ", ".join(f"{s} {b} B ({full_bytes / b:.0f}x)" for s, b in sizes.items()))
    assert all(b <= (4 * k + 8 * k) * blocks for b in sizes.values())  # fp32 scalars + int64 seeds
    assert full_bytes / sizes["{}"] >= 1000


def test_a_round_generates_each_basis_once_and_zero_coordinates_cost_nothing():
    adapter, model = tiny({"name": "ferret", "k": 4, "seed_pool": "per_round"})
    for client in range(3):  # three clients of one round share the round's seeds
        roundtrip(adapter, random_update(adapter, model, seed=client), WireContext(0, client, 0))
    assert adapter.bases.generated == sum(adapter.ks)
    update = {k: torch.zeros_like(t) for k, t in random_update(adapter, model).items()}
    update["lm_head.weight"] += 0.01
    client, _ = tiny({"name": "ferret", "k": 4})
    server, _ = tiny({"name": "ferret", "k": 4})  # its own process: nothing cached
    wire = serialize(client.encode(update, WireContext(1, 0, 0)))
    decoded = server.decode(deserialize(wire), WireContext(1, 0, 0))
    assert server.bases.generated == 4  # only the lm_head block has non-zero coordinates
    assert float(decoded["lm_head.weight"].abs().sum()) > 0 and float(decoded["model.embed_tokens.weight"].abs().sum()) == 0


# ---- the full-parameter baseline -------------------------------------------------------
def test_trainable_regex_selects_the_tuned_weights_for_both_adapters():
    full, model = tiny({"name": "full", "trainable": r"self_attn\.(q|v)_proj"})
    names = list(full.trainable(model))
    assert len(names) == 4 and all("q_proj" in n or "v_proj" in n for n in names)
    ferret, model = tiny({"name": "ferret", "k": 4, "trainable": r"mlp\."})
    assert {n for b in ferret.blocks for n in b.names} == set(ferret.trainable(model)) and len(ferret.blocks) == 6


def test_full_sends_the_whole_update_and_exports_only_a_merged_model(tmp_path):
    from transformers import AutoModelForCausalLM

    adapter, model = tiny({"name": "full"})
    update = random_update(adapter, model)
    out, size = roundtrip(adapter, update, WireContext(0, 0, 0))
    assert all(torch.equal(out[k], update[k]) for k in update)
    assert 4 * flat(update).numel() < size < 4 * flat(update).numel() + 8192
    adapter.load(model, {k: p.detach() + update[k] for k, p in adapter.trainable(model).items()})
    adapter.export(model, str(tmp_path / "merged"), "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    ids = torch.tensor([[1, 2, 3, 4]])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
    with pytest.raises(ValueError, match="merged"):
        adapter.export(model, str(tmp_path / "peft"), "peft")


# ---- a federation ----------------------------------------------------------------------
def test_a_ferret_federation_lowers_the_eval_loss_and_the_ledger_counts_its_bytes(tmp_path):
    raw = tiny_recipe(tmp_path, client={"max_steps": 4, "learning_rate": 0.05, "optim": "sgd"}, federation={"rounds": 3})
    fed = engine.Federation(recipe_from_dict({**raw, "adapter": {"name": "ferret", "k": 4}}), tmp_path / "runs" / "run")
    fed.start()
    before = fed.evaluate(fed.data.eval)["eval_loss"]
    rows = fed.run()
    assert rows[-1]["eval_loss"] < before - 0.3, (before, [r["eval_loss"] for r in rows])
    ledger = [json.loads(line) for line in (fed.run_dir / "ledger.jsonl").read_text().splitlines()]
    full_bytes = 4 * sum(p.numel() for p in fed.params.values())
    assert fed.own_aggregation is not None and len(ledger) == 3 * 2 and all(e["bytes_up"] < full_bytes / 1000 for e in ledger)
    # the download is the aggregate of every round the client missed since it last took part
    for e in ledger:
        t = e["round"] - 1  # the ledger counts rounds from 1, the participation from 0
        last = fed.participation.last_round(e["client"], t)
        assert e["bytes_down"] == sum(fed.own_aggregation.sizes[last:t]) < full_bytes / 100
    assert [e["bytes_down"] for e in ledger[:2]] == [0, 0] and len(fed.own_aggregation.sizes) == 3
    meta = json.loads((fed.run_dir / "run_meta.json").read_text())["adapter"]
    assert meta["ferret_generator_device"] == "cpu" and meta["ferret_blocks"] == 18
    assert (fed.run_dir / "final" / "model.safetensors").exists()


# ---- aggregation in coordinate space ----------------------------------------------------
def two_rounds(tmp_path, name, adapter, compact=True, rounds=2):
    raw = tiny_recipe(tmp_path, client={"max_steps": 2, "learning_rate": 0.05, "optim": "sgd"},
                      federation={"rounds": rounds, "num_clients": 4, "clients_per_round": 3})
    fed = engine.Federation(recipe_from_dict({**raw, "adapter": {"name": "ferret", "k": 6, **adapter}}), tmp_path / name)
    if not compact:  # the generic path: every client decoded, the strategy's own collector
        fed.server.own_aggregation = None
    return fed


@pytest.mark.parametrize("adapter", [{}, {"seed_pool": "shared"}, {"seed_pool": "per_round", "orthogonalize": True}])
def test_the_compact_path_equals_decoding_every_client(tmp_path, adapter):
    states = []
    for compact in (True, False):
        fed = two_rounds(tmp_path, f"c{compact}", adapter, compact)
        assert (fed.own_aggregation is not None) == compact
        start = {k: t.clone() for k, t in fed.global_state.items()}  # the compact path updates x^t in place
        for t in range(2):
            fed.global_state = fed.run_round(t).global_state
        states.append(fed.global_state)
    moved = max(float((states[0][k] - start[k]).abs().max()) for k in states[0])
    for k in states[0]:
        torch.testing.assert_close(states[0][k], states[1][k], rtol=1e-5, atol=1e-7)
    assert moved > 1e-4  # the rounds really changed the weights


def test_a_client_applying_the_downloads_holds_the_servers_weights_bit_for_bit(tmp_path, monkeypatch):
    fed = two_rounds(tmp_path, "run", {}, rounds=3)
    client = {k: t.clone() for k, t in fed.global_state.items()}  # x^0: the base weights everyone has
    downloads = []
    apply = fed.adapter.apply_broadcast

    def capture(message, state, ctx):  # the server applies each round's download to x^t
        downloads.append(serialize(message))
        apply(deserialize(downloads[-1]), state, ctx)

    monkeypatch.setattr(fed.adapter, "apply_broadcast", capture)
    for t in range(3):
        fed.global_state = fed.run_round(t).global_state
    assert [len(d) for d in downloads] == fed.own_aggregation.sizes
    for t, wire in enumerate(downloads):  # a client that missed every round catches up in order
        apply(deserialize(wire), client, WireContext(t, -1, 0))
    assert all(torch.equal(client[k], fed.global_state[k]) for k in client)


def test_a_shared_pool_generates_each_basis_once_per_round(tmp_path):
    fed = two_rounds(tmp_path, "run", {"seed_pool": "per_round"})
    fed.run_round(0)
    assert fed.adapter.bases.generated == sum(fed.adapter.ks)  # 3 clients' projections + the server's rebuild


def test_compact_download_sizes_are_checkpointed_and_resumed(tmp_path):
    fed = two_rounds(tmp_path, "run", {}, rounds=2)
    fed.start()
    fed.run()
    again = engine.Federation(fed.recipe, fed.run_dir)
    again.resume()
    assert again.own_aggregation.sizes == fed.own_aggregation.sizes and len(fed.own_aggregation.sizes) == 2 and min(fed.own_aggregation.sizes) > 0

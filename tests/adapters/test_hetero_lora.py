"""Heterogeneous LoRA ranks: FlexLoRA hands each client the best rank-r_c approximation
(Eckart–Young) of the averaged ΔW at the scale it trains with; zero-padding averages mixed
ranks as computed by hand; only a client's own rank travels up."""
import json

import pytest
import torch

from fedllm.adapters.hetero_lora import A_KEY, B_KEY
from fedllm.channel import Channel
from fedllm.collectors import StreamedMean, message_template
from fedllm.distributed import Reducer
from fedllm.engine import run_recipe
from fedllm.models import build_model
from fedllm.recipe import recipe_from_dict
from fedllm.registry import ADAPTERS, STRATEGIES, RecipeError
from fedllm.strategies.base import RoundInfo, Update
from fedllm.wire import WireContext

R, ALPHA, RANKS, WEIGHTS = 8, 16.0, [2, 4, 8], [1.0, 2.0, 3.0]


def hetero(aggregation):
    recipe = recipe_from_dict({
        "adapter": {"name": "hetero_lora", "r": R, "alpha": ALPHA, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
                    "ranks": RANKS, "aggregation": aggregation},
        "federation": {"num_clients": 3, "clients_per_round": 3},
    })
    _, model, adapter = build_model(recipe)
    adapter.assign_tiers(None, 3)
    return model, adapter, adapter.trainable(model)


def layers(model):
    """(module name, its LoRA layer), with the state keys of its A and B."""
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def effective(model, name, layer):
    """ΔW the model applies now: its scaling × B·A."""
    return layer.scaling["default"] * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach().double()


def client_deltas(global_state, gen):
    """A random Δ per client, in its own rank's shapes."""
    out = []
    for k in RANKS:
        delta = {}
        for key, t in global_state.items():
            delta[key] = 0.1 * torch.randn(t[:k].shape if A_KEY in key else t[:, :k].shape, generator=gen)
        out.append(delta)
    return out


def padded(delta, like):
    return {k: torch.cat([t, t.new_zeros(like[k].shape[0] - t.shape[0], t.shape[1])]) if A_KEY in k
            else torch.cat([t, t.new_zeros(t.shape[0], like[k].shape[1] - t.shape[1])], dim=1) for k, t in delta.items()}


def info(weight):
    return RoundInfo(0, [0, 1, 2], weight, 3)


@pytest.mark.parametrize("split", ["b", "balanced"])
def test_flexlora_gives_each_rank_the_best_approximation_at_its_scale(split):
    model, adapter, params = hetero("flexlora")
    adapter.flexlora_split = split
    gen = torch.Generator().manual_seed(0)
    start = {k: torch.randn(t.shape, generator=gen) * 0.3 for k, t in adapter.state(model).items()}
    deltas = client_deltas(start, gen)
    # by hand: each client's ΔW = its scale × (its start factors + Δ), read off the model itself
    mean = {}
    for c, delta in enumerate(deltas):
        adapter.load(model, start, params)
        adapter.for_client(model, params, start, c)
        for name, layer in layers(model):
            key = next(k for k in start if k.startswith(name + A_KEY))
            b_key = key.replace(A_KEY, B_KEY)
            assert layer.scaling["default"] == ALPHA / RANKS[c]
            a = layer.lora_A["default"].weight.detach().double() + padded(delta, start)[key].double()
            b = layer.lora_B["default"].weight.detach().double() + padded(delta, start)[b_key].double()
            mean[name] = mean.get(name, 0) + WEIGHTS[c] * layer.scaling["default"] * (b @ a) / sum(WEIGHTS)
    collect = adapter.aggregation(STRATEGIES.build({"name": "fedavg"}), 0).collector(0)
    for c, delta in enumerate(deltas):
        assert collect.add(c, delta, WEIGHTS[c])
    new_global, _ = collect.finish(None, start, {}, info, Reducer(torch.device("cpu")))

    for c, k in enumerate(RANKS):
        adapter.load(model, new_global, params)
        adapter.for_client(model, params, new_global, c)
        for name, layer in layers(model):
            u, s, vh = torch.linalg.svd(mean[name])
            best = (u[:, :k] * s[:k]) @ vh[:k]
            got = effective(model, name, layer)
            assert torch.allclose(got, best, atol=1e-5), (name, k)
            # Eckart–Young: the error is the energy of the dropped singular values
            assert torch.linalg.norm(mean[name] - got) == pytest.approx(float(s[k:].square().sum().sqrt()), abs=1e-5)
    adapter.load(model, new_global, params)  # the global view: rank r at α/r
    assert all(layer.scaling["default"] == ALPHA / R for _, layer in layers(model))


@pytest.mark.parametrize("mean", ["products", "changes"])
def test_flexlora_products_forget_what_low_ranks_cannot_hold_and_changes_keep_it(mean):
    model, adapter, params = hetero("flexlora")
    adapter.flexlora_mean = mean
    gen = torch.Generator().manual_seed(2)
    start = {k: torch.randn(t.shape, generator=gen) * 0.3 for k, t in adapter.state(model).items()}
    svd = adapter.aggregation(STRATEGIES.build({"name": "fedavg"}), 0).collector(0)
    for c in range(3):  # the global in SVD form first
        svd.add(c, {k: torch.zeros(adapter.client_shape(k, c)) for k in start}, WEIGHTS[c])
    start, _ = svd.finish(None, start, {}, info, Reducer(torch.device("cpu")))
    collect = adapter.aggregation(STRATEGIES.build({"name": "fedavg"}), 0).collector(1)
    for c in range(3):  # nobody learns anything
        collect.add(c, {k: torch.zeros(adapter.client_shape(k, c)) for k in start}, WEIGHTS[c])
    after, _ = collect.finish(None, start, {}, info, Reducer(torch.device("cpu")))
    # component j of the global survives with the weight share of the clients of rank >= j
    share = torch.tensor([sum(w for w, k in zip(WEIGHTS, RANKS) if k > j) / sum(WEIGHTS) for j in range(R)]).double()
    for key in (k for k in start if A_KEY in k):
        b_key = key.replace(A_KEY, B_KEY)
        s_before = torch.linalg.svdvals(start[b_key].double() @ start[key].double())[:R]
        s_after = torch.linalg.svdvals(after[b_key].double() @ after[key].double())[:R]
        expected = s_before if mean == "changes" else (s_before * share).sort(descending=True).values
        assert torch.allclose(s_after, expected, rtol=1e-4, atol=1e-6), key
    kept = collect.energy[1] / collect.energy[0]  # the logged share the truncated starts kept
    assert 0.0 < kept < 1.0


def test_zero_padding_of_mixed_ranks_is_the_hand_computed_mean_in_global_units():
    model, adapter, params = hetero("zero_pad")
    gen = torch.Generator().manual_seed(1)
    start = {k: torch.randn(t.shape, generator=gen) * 0.3 for k, t in adapter.state(model).items()}
    deltas = client_deltas(start, gen)
    channel, strategy = Channel(adapter, []), STRATEGIES.build({"name": "fedavg"})
    collect = StreamedMean(lambda: message_template(strategy, start))
    sizes = []
    for c, delta in enumerate(deltas):
        message, size = channel.up(padded(delta, start), {}, WireContext(0, c, 0), {})
        sizes.append(size)
        assert collect.add(c, message, WEIGHTS[c])
    new_global, _ = collect.finish(strategy, start, {}, info, Reducer(torch.device("cpu")))
    for key, t in start.items():
        # by hand: pad to rank r; B in global units is (r / r_c)·B_c
        parts = [padded(d, start)[key] * (1.0 if A_KEY in key else R / k) for d, k in zip(deltas, RANKS)]
        hand = t + sum(w * p for w, p in zip(WEIGHTS, parts)) / sum(WEIGHTS)
        assert torch.allclose(new_global[key], hand, atol=1e-6), key
    assert sizes[0] < sizes[1] < sizes[2]  # only the client's own rank travels

    # units agree: one rank-2 client's trained ΔW is what the global applies on its components
    collect = StreamedMean(lambda: message_template(strategy, start))
    adapter.load(model, start, params)
    x_c = adapter.for_client(model, params, start, 0)
    message, _ = channel.up(padded(deltas[0], start), {}, WireContext(0, 0, 0), {})
    collect.add(0, message, 1.0)
    one, _ = collect.finish(strategy, start, {}, info, Reducer(torch.device("cpu")))
    for key in (k for k in start if A_KEY in k):
        b_key, trained = key.replace(A_KEY, B_KEY), padded(deltas[0], start)
        client = (ALPHA / 2) * (x_c[b_key] + trained[b_key])[:, :2] @ (x_c[key] + trained[key])[:2]
        server = (ALPHA / R) * one[b_key][:, :2] @ one[key][:2]
        assert torch.allclose(client, server, atol=1e-5)


def test_a_client_downloads_only_the_factors_of_its_rank():
    from safetensors.torch import save

    model, adapter, _ = hetero("zero_pad")
    _, flex_adapter, _ = hetero("flexlora")
    state = adapter.state(model)
    down = Channel(adapter, []).down(state, {}, torch.device("cpu"))
    flex = flex_adapter.aggregation(STRATEGIES.build({"name": "fedavg"}), 0)
    sizes = []
    for c, k in enumerate(RANKS):
        # by hand: the safetensors file of A[:k] and B[:, :k], what a rank-k client holds
        own = {key: (t[:k] if A_KEY in key else t[:, :k]).contiguous() for key, t in state.items()}
        assert down.bytes_for(c) == len(save(own)) == flex.download_bytes(0, 0, state, c)
        sizes.append(down.bytes_for(c))
    # a rank-8 client receives 6 more components than a rank-2 one: 6·(in + out) floats per module
    per_rank = sum(t.shape[1] * 4 for key, t in state.items() if A_KEY in key) + \
        sum(t.shape[0] * 4 for key, t in state.items() if B_KEY in key)
    assert abs(sizes[2] - sizes[0] - 6 * per_rank) < 8 * len(state)  # the header differs only in its digits
    assert sizes[0] < len(save(state)) == sizes[2]


def test_rank_by_tier_needs_devices_and_ranks_must_fit():
    with pytest.raises(RecipeError, match="1..adapter.r=8"):
        ADAPTERS.build({"name": "hetero_lora", "r": 8, "ranks": [4, 16]})
    with pytest.raises(RecipeError, match="exactly one of"):
        ADAPTERS.build({"name": "hetero_lora", "r": 8})
    _, _, adapter = build_model(recipe_from_dict({"adapter": {"name": "hetero_lora", "r": 8, "rank_by_tier": [2, 8]}}))
    with pytest.raises(RecipeError, match="needs federation.devices"):
        adapter.assign_tiers(None, 4)
    adapter.assign_tiers(lambda count: [0, 1, 1, 0], 4)
    assert adapter.client_ranks == [2, 8, 8, 2]


@pytest.mark.parametrize("aggregation", ["flexlora", "zero_pad"])
def test_a_mixed_rank_federation_trains_and_sends_less_from_low_ranks(recipe_file, aggregation):
    run_dir = run_recipe(str(recipe_file(
        adapter={"name": "hetero_lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
                 "rank_by_tier": [1, 4], "aggregation": aggregation},
        federation={"rounds": 2, "num_clients": 4, "clients_per_round": 4, "devices": {"profile": "lognormal"}},
        output={"name": aggregation})))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["eval_loss"] < rows[0]["eval_loss"]
    ledger = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    assert len({r["bytes_up"] for r in ledger}) == 2  # two ranks, two message sizes
    # each client downloads only its own rank: the rank-1 clients, who upload less, download less
    assert {(r["bytes_up"] < max(x["bytes_up"] for x in ledger), r["bytes_down"]) for r in ledger} == {
        (True, min(x["bytes_down"] for x in ledger)), (False, max(x["bytes_down"] for x in ledger))}

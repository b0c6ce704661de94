"""Federated adversarial training (adversarial wrapper) on a tiny Llama through the real
Client: the embedding-space PGD raises the loss at the perturbed input before the step,
stays inside its radius, and composes with FedProx and SCAFFOLD (their hooks still act on
the adversarial gradient; with a vanishing radius the update is the inner strategy's)."""
import pytest
import torch

from fedllm.data import collate
from fedllm.engine import Federation
from fedllm.recipe import recipe_from_dict
from fedllm.registry import STRATEGIES
from fedllm.state import ClientRecord
from fedllm.strategies.base import ClientContext
from tests.conftest import tiny_recipe


def federation(tmp_path, strategy: dict, name: str = "run") -> Federation:
    recipe = recipe_from_dict(tiny_recipe(tmp_path, strategy=strategy, client={"optim": "sgd", "learning_rate": 0.5}))
    return Federation(recipe, tmp_path / name)


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    return federation(tmp_path_factory.mktemp("adv"), {"name": "fedavg"})


@pytest.mark.parametrize("mode", ["freelb", "pgd"])
def test_the_perturbation_raises_the_loss_at_the_perturbed_input_before_the_step(fed, mode):
    strategy = STRATEGIES.build({"name": "adversarial", "radius": 2.0, "steps": 3, "gradient": mode})
    model, params = fed.model, fed.params
    fed.adapter.load(model, fed.global_state, params)
    inputs = collate(fed.data.clients[0][:4], fed.pad_token_id)
    hooks = strategy.client_hooks(0, 0)
    embed = model.get_input_embeddings()
    hooks.begin(params, ClientContext(0, 0, fed.global_state, {}, {}, 0.1, 1, None, lambda: embed, 1))
    loss_of = lambda batch: model(**batch).loss  # noqa: E731
    with torch.no_grad():
        clean = float(model(**inputs).loss)
    adversarial = float(hooks.backward(inputs, loss_of, default=None))
    with torch.no_grad():  # the final δ, evaluated on its own
        at_delta = float(loss_of({"inputs_embeds": embed(inputs["input_ids"]) + hooks.last_delta,
                                  "attention_mask": inputs["attention_mask"], "labels": inputs["labels"]}))
    norms = hooks.last_delta.flatten(1).norm(dim=1)
    assert at_delta > clean + 0.01 and adversarial > clean  # measured: see the report
    assert bool((norms <= 2.0 + 1e-5).all()) and bool((norms > 0.5).all())
    print(f"{mode}: clean loss {clean:.4f}, trained-on {adversarial:.4f}, at the final δ {at_delta:.4f}")
    assert any(bool(p.grad.abs().sum() > 0) for p in params.values())  # it left gradients to step on
    for p in params.values():
        p.grad = None


def one_client(fed, cid: int = 0):
    upload = fed.client.run(cid, 0, fed.global_state, fed.strategy.broadcast(fed.server_state), ClientRecord(), 0.5)
    return {k: upload.update[k].clone() for k in upload.update}, upload


@pytest.mark.slow
@pytest.mark.parametrize("inner", [{"name": "fedprox", "mu": 0.5}, {"name": "scaffold"}])
def test_composes_with_fedprox_and_scaffold(tmp_path, inner):
    plain = federation(tmp_path, inner, "plain")
    tiny = federation(tmp_path, {"name": "adversarial", "inner": inner, "radius": 1e-7, "init": 0.0}, "tiny")
    strong = federation(tmp_path, {"name": "adversarial", "inner": inner, "radius": 2.0, "steps": 2}, "strong")
    base, base_upload = one_client(plain)
    near, near_upload = one_client(tiny)
    far, far_upload = one_client(strong)
    for k in base:  # the inner strategy's hooks ran on the (vanishingly) perturbed gradient
        torch.testing.assert_close(near[k], base[k], rtol=1e-4, atol=1e-6)
    assert sum(float((far[k] - base[k]).norm()) for k in base) > 1e-3  # a real perturbation changes the update
    assert far_upload.extras.keys() == base_upload.extras.keys()  # SCAFFOLD's Δc still travels
    if inner["name"] == "scaffold":
        scale = 1.0 / (2 * 0.5)  # c = c_i = 0 at round 0: Δc_i = −Δ/(K η_l)
        for k in far:
            torch.testing.assert_close(far_upload.extras[f"dc.{k}"], -scale * far[k])
    result = strong.run_round(0)  # and a whole round through the engine
    assert all(s.accepted for s in result.stats)


def test_dp_sgd_refuses_to_wrap_it_and_it_refuses_a_dp_inner():
    with pytest.raises(ValueError, match="adversarial"):
        STRATEGIES.build({"name": "dp_sgd", "inner": {"name": "adversarial"}})
    with pytest.raises(ValueError, match="per-example backward"):
        STRATEGIES.build({"name": "adversarial", "inner": {"name": "dp_sgd"}})

"""Local DP-SGD: exact per-example clipping, noise of std σC/B, and per-client ε."""
from types import SimpleNamespace

import pytest
import torch

from fedllm.adapters.base import Adapter
from fedllm.client import Client
from fedllm.client import post_step_clip
from fedllm.privacy.dp_sgd import clipped_gradient_sum, single_examples, spending_fronts
from fedllm.recipe import ClientConfig
from fedllm.registry import STRATEGIES
from fedllm.strategies.base import ClientContext, ClientHooks, RoundInfo, Strategy, Update
from fedllm.state import ClientRecord
from fedllm.training import LocalLoop, LocalResult, default_steps


def squared_error(params):
    return lambda batch: ((batch["x"] @ params["w"] - batch["y"]) ** 2).mean()


def test_each_example_is_clipped_before_the_sum():
    gen = torch.Generator().manual_seed(0)
    params = {"w": torch.nn.Parameter(torch.randn(5, generator=gen))}
    batch = {"x": torch.randn(6, 5, generator=gen), "y": 10 * torch.randn(6, generator=gen)}
    sums, loss, count = clipped_gradient_sum(params, batch, squared_error(params), clip=1.0)
    with torch.no_grad():
        per_example = 2 * (batch["x"] @ params["w"] - batch["y"])[:, None] * batch["x"]  # ∇(x·w − y)²
        norms = per_example.norm(dim=1, keepdim=True)
        expected = (per_example * (1.0 / (norms + 1e-6)).clamp(max=1.0)).sum(0)
    assert count == 6 and norms.min() > 1.0  # every example needed clipping
    torch.testing.assert_close(sums["w"], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, ((batch["x"] @ params["w"] - batch["y"]) ** 2).mean().detach())


def test_padding_is_trimmed_per_example():
    batch = {"input_ids": torch.tensor([[5, 6, 7, 0], [8, 0, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])}
    rows = list(single_examples(batch))
    assert [r["input_ids"].tolist() for r in rows] == [[[5, 6, 7]], [[8]]]


def test_the_step_gradient_gets_noise_of_std_sigma_c_over_b(run_info):
    s = STRATEGIES.build({"name": "dp_sgd", "max_grad_norm": 0.5})
    s.setup(run_info(privacy={"noise_multiplier": 2.0}))
    params = {"w": torch.nn.Parameter(torch.ones(100_000))}
    hooks = s.client_hooks(0, 0)
    hooks.begin(params, ClientContext(0, 0, {"w": torch.ones(100_000)}, {}, {}, 0.1, 1))
    x = torch.zeros(8, 100_000)
    batch = {"x": x, "y": torch.zeros(8)}  # zero residual: every per-example gradient is 0
    torch.manual_seed(0)
    for half in (batch["x"][:4], batch["x"][4:]):  # two micro-batches of one step (accumulation)
        hooks.backward({"x": half, "y": torch.zeros(4)}, squared_error(params), default=None)
    hooks.before_step(params, regrad=None)
    assert params["w"].grad.std().item() == pytest.approx(2.0 * 0.5 / 8, rel=0.01)


def test_target_epsilon_bounds_the_worst_client(run_info):
    s = STRATEGIES.build({"name": "dp_sgd"})
    # sampling rates b/n_i = 0.5, 1 and 0.25
    s.setup(run_info(rounds=4, num_clients=3, client_sizes=[16, 8, 32], local_steps=[5, 5, 5], batch_size=8,
                     privacy={"target_epsilon": 3.0}))
    x = {"w": torch.zeros(2)}
    state = s.init(x)
    for t in range(4):
        assert s.stop_reason(t, state) is None
        _, state = s.aggregate(x, Update(x), state, RoundInfo(t, [0, 1, 2], 3.0, 3))
    ledgers = s.ledgers(state)
    spent = {c: ledgers[c].epsilon(1e-5) for c in ledgers}
    assert spent[1] == pytest.approx(3.0, rel=1e-3) and spent[1] <= 3.0  # the smallest client spends most
    assert spent[2] < spent[0] < spent[1]
    assert s.metrics(state)["epsilon"] == spent[1]
    assert "past the budget" in s.stop_reason(4, state)


@STRATEGIES.register("test_raw_gradient_inner")
class RawGradient(Strategy):
    """Test strategy: its client hooks read a raw gradient of the client's data."""

    def client_hooks(self, round, client_id):
        class Hooks(ClientHooks):
            def begin(self, params, ctx):
                ctx.gradient(None)

        return Hooks()


def test_a_wrapped_strategy_cannot_read_raw_gradients(run_info):
    s = STRATEGIES.build({"name": "dp_sgd", "inner": {"name": "test_raw_gradient_inner"}})
    s.setup(run_info(privacy={"noise_multiplier": 1.0}))
    params = {"w": torch.nn.Parameter(torch.zeros(2))}
    ctx = ClientContext(0, 0, {"w": torch.zeros(2)}, {}, {}, 0.1, 1, gradient=lambda limit: {"w": torch.ones(2)})
    with pytest.raises(ValueError, match="bypass per-example clipping"):
        s.client_hooks(0, 0).begin(params, ctx)


def test_a_slightly_larger_client_with_one_more_step_is_calibrated_for(run_info):
    # num_train_epochs = 1, batch 8: 16 examples → rate 0.5, 2 steps; 17 → rate 0.47, 3 steps.
    # Calibrating for the highest rate alone let the second client spend ε 3.51 of 3.
    cfg = ClientConfig(max_steps=None, num_train_epochs=1, per_device_train_batch_size=8)
    sizes = [16, 17]
    steps = [default_steps(cfg, n) for n in sizes]
    assert steps == [2, 3]
    s = STRATEGIES.build({"name": "dp_sgd"})
    s.setup(run_info(rounds=20, num_clients=2, client_sizes=sizes, local_steps=steps, batch_size=8,
                     privacy={"target_epsilon": 3.0}))
    x = {"w": torch.zeros(2)}
    state = s.init(x)
    for t in range(20):
        assert s.stop_reason(t, state) is None  # no early stop: the budget covers the planned rounds
        _, state = s.aggregate(x, Update(x), state, RoundInfo(t, [0, 1], 2.0, 2))
    spent = {c: ledger.epsilon(1e-5) for c, ledger in s.ledgers(state).items()}
    assert max(spent.values()) <= 3.0
    assert spent[1] == pytest.approx(3.0, rel=1e-3) and spent[0] < spent[1]  # the 3-step client spends most


def test_only_undominated_rate_step_pairs_are_calibrated():
    assert spending_fronts([0.5, 0.47, 0.5, 0.25], [2, 3, 2, 3]) == [(0.47, 3), (0.5, 2)]
    assert spending_fronts([0.5, 0.25], [3, 2]) == [(0.5, 3)]


class OneSGDStep(LocalLoop):
    """One plain SGD step on the squared error of a fixed batch, through the step driver."""

    name = "one SGD step"
    supports = frozenset({"per_example"})

    def train(self, job, driver):
        w = job.params["w"]
        batch = {"x": torch.ones(4, 3), "y": torch.full((4,), 100.0)}  # every example's gradient: norm ≫ C
        loss = driver.backward(batch, squared_error(job.params), default=None)

        def sgd_step():
            with torch.no_grad():
                w.sub_(job.lr * w.grad)

        driver.step(sgd_step, lambda: setattr(w, "grad", None))
        return LocalResult({"w": w.detach() - job.x_t["w"]}, 4, float(loss), 1, None)


def test_the_noisy_step_is_not_clipped_again_by_client_max_grad_norm(run_info, caplog):
    s = STRATEGIES.build({"name": "dp_sgd", "max_grad_norm": 1.0})
    s.setup(run_info(num_clients=1, client_sizes=[4], batch_size=4, privacy={"noise_multiplier": 1e-6, "noise_seed": 0}))
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.zeros(3))
    cfg = SimpleNamespace(max_steps=1, gradient_accumulation_steps=1, per_device_train_batch_size=4, num_train_epochs=None,
                          max_grad_norm=1e-3, keep_optimizer_state=False)  # set in the recipe: ignored, with a warning
    with caplog.at_level("WARNING"):
        client = Client(model, {"w": model.w}, Adapter(), s, OneSGDStep(), cfg, [[{}] * 4], 0, torch.device("cpu"), seed=0)
    assert "client.max_grad_norm=0.001 is ignored" in caplog.text
    upload = client.run(0, 0, {"w": torch.zeros(3)}, {}, ClientRecord(), lr=0.1)
    # all four clipped per-example gradients point the same way with norm C = 1, so the DP-SGD
    # step is lr · 1 (the noise is ~1e-6); a second clip would have made it lr · 1e-3
    assert upload.update["w"].norm().item() == pytest.approx(0.1, rel=1e-4)


def test_other_strategies_keep_client_max_grad_norm():
    assert post_step_clip(STRATEGIES.build({"name": "fedavg"}), 0.5) == 0.5
    assert post_step_clip(STRATEGIES.build({"name": "dp_fedavg"}), 0.5) == 0.5  # clips the upload, not per example
    assert post_step_clip(STRATEGIES.build({"name": "dp_brem"}), None) is None


@pytest.fixture(scope="module")
def lora_llama(tmp_path_factory):
    import contextlib
    import sys
    from pathlib import Path

    from fedllm.models import build_model
    from fedllm.recipe import recipe_from_dict

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from conftest import tiny_recipe

    recipe = recipe_from_dict(tiny_recipe(tmp_path_factory.mktemp("vmap")))
    tokenizer, model, adapter = build_model(recipe, torch.device("cpu"))
    model.train()
    from fedllm.training import ModelLoss

    return model, adapter.trainable(model), ModelLoss(model, contextlib.nullcontext())


def padded_batch(lengths, seed=0):
    from fedllm.data.tokenize import collate

    gen = torch.Generator().manual_seed(seed)
    examples = []
    for n in lengths:
        ids = torch.randint(5, 120, (n,), generator=gen).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3:]})
    return collate(examples, pad_token_id=0)


def test_vmap_and_the_loop_give_the_same_clipped_gradients_on_a_lora_llama(lora_llama):
    from fedllm.privacy.dp_sgd import looped_clipped_sum, vectorized_clipped_sum

    model, params, loss_of = lora_llama
    batch = padded_batch([9, 23, 5, 17, 12])  # right padding of very different lengths
    loop, loop_loss, n = looped_clipped_sum(params, batch, loss_of, clip=0.05)
    vmap, vmap_loss, m = vectorized_clipped_sum(params, batch, loss_of, clip=0.05)
    assert n == m == 5 and all(p.grad is None for p in params.values())
    assert sum(float(t.abs().sum()) for t in loop.values()) > 0
    for k in loop:
        torch.testing.assert_close(vmap[k], loop[k], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(vmap_loss, loop_loss, rtol=1e-5, atol=1e-6)


def test_vmap_failing_on_a_model_falls_back_to_the_loop_once_with_a_warning(lora_llama, caplog, monkeypatch):
    import fedllm.privacy.dp_sgd as dp_sgd

    model, params, loss_of = lora_llama
    monkeypatch.setattr(dp_sgd, "FELL_BACK", set())

    class NoBatchingRule:
        def __call__(self, sub_batch):
            return loss_of(sub_batch)

        def with_params(self, tensors, sub_batch):
            raise RuntimeError("vmap: batching rule not implemented for aten::some_op")

    batch = padded_batch([7, 11])
    sums, _, count = dp_sgd.clipped_gradient_sum(params, batch, NoBatchingRule(), clip=1.0, owner="test")
    reference, _, _ = dp_sgd.looped_clipped_sum(params, batch, loss_of, clip=1.0)
    assert count == 2 and all(torch.equal(sums[k], reference[k]) for k in sums)
    assert "using one backward per example" in caplog.text and dp_sgd.FELL_BACK == {"test"}


def test_a_left_padded_batch_is_not_vectorised():
    from fedllm.privacy.dp_sgd import right_padded

    assert right_padded({"attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]])})
    assert not right_padded({"attention_mask": torch.tensor([[0, 1, 1], [1, 1, 1]])})

"""Adversarial training in client groups (federation.group_size): each rank perturbs its share
of the group's G·b draw with the rows of δ₀ one rank with the whole batch draws, weights its
share's loss as the loop does, and the group ends where one rank with batch G·b ends."""
import contextlib
import json
from pathlib import Path

import pytest
import torch
import yaml

from fedllm.data import collate
from fedllm.engine import Federation, run_recipe
from fedllm.recipe import recipe_from_dict
from fedllm.registry import STRATEGIES
from fedllm.seeds import derive
from fedllm.strategies.adversarial import AdversarialHooks
from fedllm.strategies.base import ClientContext, Strategy
from fedllm.training import ModelLoss
from tests.conftest import tiny_recipe
from tests.engine.test_groups import launch
from tests.engine.test_zero_groups import needs_deepspeed
from tests.privacy.test_dp_groups import TwoRanks, adapter, max_difference

B = 2  # per-rank batch in the group of 2; the one-rank reference trains with 2·B
# Equal up to float rounding (shorter padding, two partial gradients added, a loss weighted by
# G·n_r/N). Measured max differences: one micro-batch's gradient (entries up to 0.14) 3.0e-8
# freelb, 6.5e-8 pgd; the final adapter (entries up to 0.13) 7.5e-9 freelb/ddp, 1.5e-8 pgd/fsdp,
# 7.5e-9 freelb/zero3. δ₀ drawn per rank as before groups (and by one rank the same way): 6.7e-3
# on the gradient, 1.5e-3 on the adapter (pgd/ddp).
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}
STRONG = {"name": "adversarial", "radius": 2.0, "steps": 2, "init": 1.0}  # a δ large enough to move the step


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    recipe = tiny_recipe(tmp_path_factory.mktemp("advgroups"), client={"optim": "sgd", "learning_rate": 0.5})
    return Federation(recipe_from_dict(recipe), tmp_path_factory.mktemp("advgroups") / "run")


def group_batch(fed, labelled_second_half: bool = True) -> list[dict]:
    """4 examples of different lengths, so a share pads shorter than the whole batch."""
    examples = sorted(fed.data.clients[0][:8], key=lambda e: len(e["input_ids"]))
    examples = [examples[0], examples[7], examples[3], examples[5]]
    if not labelled_second_half:
        examples[2:] = [{**e, "labels": [-100] * len(e["labels"])} for e in examples[2:]]
    return examples


def micro_batch(fed, mode: str, examples: list[dict], **group) -> tuple[dict, float, torch.Tensor]:
    """(p.grad, the returned loss, the final δ) after the hooks' backward on one micro-batch."""
    model, params = fed.model, fed.params
    fed.adapter.load(model, fed.global_state, params)
    hooks = STRATEGIES.build({**STRONG, "gradient": mode}).client_hooks(0, 0)
    hooks.begin(params, ClientContext(0, 0, fed.global_state, {}, {}, 0.1, 1, None, model.get_input_embeddings, 1, **group))
    loss = float(hooks.backward(collate(examples, fed.pad_token_id), ModelLoss(model, contextlib.nullcontext()), None))
    grads = {k: p.grad.clone() for k, p in params.items()}
    for p in params.values():
        p.grad = None
    return grads, loss, hooks.last_delta


def as_group_of_two(fed, mode: str, examples: list[dict]) -> tuple[dict, float, list[torch.Tensor]]:
    """The group's mean gradient and loss (what the loop averages), and each rank's δ."""
    group = TwoRanks()
    for group.second in (False, True):  # the first pass only records each rank's label count
        ranks = [micro_batch(fed, mode, examples[m * B:(m + 1) * B], group_sum=group.group_sum(m), group_leader=m == 0,
                             group_member=m) for m in range(2)]
    grads = {k: (ranks[0][0][k] + ranks[1][0][k]) / 2 for k in ranks[0][0]}
    return grads, (ranks[0][1] + ranks[1][1]) / 2, [r[2] for r in ranks]


def largest_difference(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("mode", ["freelb", "pgd"])
@pytest.mark.parametrize("labelled", [True, False], ids=["labelled", "a-share-without-labels"])
def test_a_group_of_two_perturbs_and_steps_as_one_rank_with_the_whole_batch(fed, mode, labelled):
    examples = group_batch(fed, labelled)
    grads, loss, delta = micro_batch(fed, mode, examples)
    group_grads, group_loss, deltas = as_group_of_two(fed, mode, examples)
    for m, share in enumerate(deltas):  # each rank's δ is one rank's rows, cut to its share's padding
        rows = delta[m * B:(m + 1) * B]
        torch.testing.assert_close(share, rows[:, :share.shape[1]], **TOLERANCE)
        assert bool((rows[:, share.shape[1]:] == 0).all())
    print(f"{mode}, {'labelled' if labelled else 'a share without labels'}: max difference "
          f"{largest_difference(group_grads, grads):.1e}, largest gradient {max(float(g.abs().max()) for g in grads.values()):.2f}, "
          f"loss {loss:.4f} vs {group_loss:.4f}")
    for k in grads:
        torch.testing.assert_close(group_grads[k], grads[k], **TOLERANCE)
    assert group_loss == pytest.approx(loss, rel=1e-6)
    assert max(float(g.abs().max()) for g in grads.values()) > 1e-3  # a real step, not zeros on both sides


def old_start(self, embeds, mask):
    """δ₀ as drawn before groups: one generator per (round, client), over each rank's padded micro-batch."""
    if not hasattr(self, "stream"):
        self.stream = torch.Generator().manual_seed(derive(0, self.round, self.client, tag="adversarial"))
    noise = (torch.rand(embeds.shape, generator=self.stream) * 2 - 1) * mask
    dims = mask.flatten(1).sum(1).clamp_min(1) * embeds.shape[-1]
    return noise * (self.init / dims.sqrt()).view(-1, 1, 1)


@pytest.mark.parametrize("wrong", ["delta0-per-rank", "unweighted-share-loss"])
def test_the_tolerance_tells_a_group_that_draws_or_weighs_per_rank(fed, monkeypatch, wrong):
    # the wrong way on one rank with the whole batch and in the group alike. Drawn per rank, the
    # ranks' δ₀ are (2, L_r, D) draws from the stream's start instead of the rows of one (4, L, D)
    # draw; unweighted, each rank's token mean counts as half the batch whatever its tokens
    if wrong == "delta0-per-rank":
        monkeypatch.setattr(AdversarialHooks, "start", old_start)
    else:
        monkeypatch.setattr(AdversarialHooks, "share_weight", lambda self, labels: 1.0)
    examples = group_batch(fed)
    grads = micro_batch(fed, "freelb", examples)[0]
    group_grads = as_group_of_two(fed, "freelb", examples)[0]
    print(f"{wrong}: max difference {largest_difference(group_grads, grads):.2e}")
    assert largest_difference(group_grads, grads) > 1e3 * TOLERANCE["atol"]


# ---- end to end: 2 gloo ranks as one group against one rank with batch 2·B ---------------
def adversarial_recipe(tmp_path: Path, mode: str) -> Path:
    raw = tiny_recipe(tmp_path, federation={"rounds": 2, "num_clients": 4, "clients_per_round": 2},
                      strategy={**STRONG, "gradient": mode}, eval={"every": 0},
                      client={"max_steps": 2, "per_device_train_batch_size": B, "gradient_accumulation_steps": 2,
                              "optim": "sgd", "learning_rate": 0.05},
                      output={"checkpoint_every": 2})
    path = tmp_path / f"adv-{mode}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def train_losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["train_loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("mode, parallel", [("freelb", "ddp"), ("pgd", "fsdp"),
                                            pytest.param("freelb", "zero3", marks=needs_deepspeed)])
def test_adversarial_training_in_a_group_of_two_ends_as_one_rank_with_twice_the_batch(tmp_path, mode, parallel):
    path = adversarial_recipe(tmp_path, mode)
    one = run_recipe(str(path), [f"client.per_device_train_batch_size={2 * B}", "output.name=one"])
    group = launch(path, 2, "group", "federation.group_size=2", f"federation.group_parallel={parallel}")
    final, expected = adapter(group), adapter(one)
    assert final.keys() == expected.keys()
    print(f"{mode} {parallel}: max difference {max_difference(final, expected):.2e}")
    for k in expected:
        torch.testing.assert_close(final[k], expected[k], **TOLERANCE)
    # the loss each client reports is the whole batch's, as one rank's
    assert train_losses(group) == pytest.approx(train_losses(one), rel=1e-5)


# ---- what loads --------------------------------------------------------------------------
@STRATEGIES.register("test_own_backward")
class OwnBackward(Strategy):
    """A strategy whose hooks run their own backward with each rank's own loss."""

    client_needs = frozenset({"per_example"})


@pytest.mark.parametrize("strategy, refused", [({"name": "adversarial"}, False),
                                               ({"name": "adversarial", "inner": {"name": "scaffold"}}, False),
                                               ({"name": "test_own_backward"}, True)])
def test_adversarial_loads_with_a_group_and_an_own_backward_that_does_not_weigh_is_refused(tmp_path, strategy, refused):
    from fedllm.capabilities import check_pairings
    from fedllm.recipe import Recipe
    from fedllm.registry import RecipeError

    recipe = Recipe.model_validate(tiny_recipe(tmp_path, federation={"group_size": 2}, strategy=strategy))
    if refused:
        with pytest.raises(RecipeError, match="'test_own_backward' runs its own backward .* use federation.group_size=1"):
            check_pairings(recipe)
    else:
        check_pairings(recipe)

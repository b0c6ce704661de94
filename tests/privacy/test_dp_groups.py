"""Per-example DP in client groups (federation.group_size): each rank clips its share of the
group's G·b draw, the group sums the clipped gradients, DP-SGD's noise is drawn once per step,
and the run ends where one rank training each client with batch G·b ends."""
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fedllm.engine import run_recipe
from fedllm.privacy.dp_sgd import PrivateGradient
from fedllm.strategies.base import ClientContext
from tests.conftest import tiny_recipe
from tests.engine.test_groups import launch

B = 2  # per-rank batch in the group of 2; the one-rank reference trains with 2·B
SIGMA = 0.5
# Equal up to float rounding (shorter padding, two partial sums added in another order).
# Measured max differences on the final adapter (entries up to 0.15): dp_sgd 7.5e-9 (vmap,
# with ddp and with fsdp), 1.5e-8 (loop); dp_brem 3.0e-8, its stored momenta 3.1e-9. Noise 2σ
# instead of σ (the same draw added on both ranks) moves the adapter by 3.4e-2
# (test_the_tolerance_tells_one_noise_draw_from_two).
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


# ---- the hooks, with the group's all-reduce played in one process ------------------------
def squared_error(params):
    return lambda batch: ((batch["x"] @ params["w"] - batch["y"]) ** 2).mean()


class TwoRanks:
    """The all-reduce of a group of two, in one process: a first pass records what each rank
    puts in; in the second, each rank's sum adds what the other put in."""

    def __init__(self):
        self.put_in, self.second = {}, False

    def group_sum(self, member: int):
        def reduce_(tensors):
            if self.second:
                for t, other in zip(tensors, self.put_in[1 - member]):
                    t.add_(other)
            else:
                self.put_in[member] = [t.clone() for t in tensors]
        return reduce_


def step_gradient(batch, w0, **group) -> torch.Tensor:
    """p.grad after one DP-SGD step of PrivateGradient on `batch` (one backward per example)."""
    w = torch.nn.Parameter(w0.clone())
    hooks = PrivateGradient(None, clip=1.0, noise_multiplier=SIGMA, noise_seed=7, vectorized=False)
    hooks.begin({"w": w}, ClientContext(round=0, client_id=0, global_state={}, broadcast={}, client_state={}, lr=0.1,
                                        steps=1, **group))
    hooks.backward(batch, squared_error({"w": w}), default=None)
    hooks.before_step({"w": w}, regrad=None)
    return w.grad


def grouped_gradients(batch, w0, leaders=(True, False)) -> list[torch.Tensor]:
    group = TwoRanks()
    halves = [{k: v[i * 2:(i + 1) * 2] for k, v in batch.items()} for i in range(2)]
    for group.second in (False, True):
        grads = [step_gradient(halves[m], w0, group_sum=group.group_sum(m), group_leader=leaders[m]) for m in range(2)]
    return grads


def test_a_group_of_two_steps_on_the_noisy_clipped_mean_of_the_whole_batch():
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(5, generator=gen)
    batch = {"x": torch.randn(4, 5, generator=gen), "y": 10 * torch.randn(4, generator=gen)}
    alone = step_gradient(batch, w0)  # (Σ_4 clip(∇ℓ_i) + one draw) / 4
    leader, member = grouped_gradients(batch, w0)
    torch.testing.assert_close(leader, alone, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(member, alone, rtol=1e-6, atol=1e-7)
    # noise drawn on both ranks (the same seed): the draw twice, off by draw/4 = N(0, σC)/4 per coordinate
    twice, _ = grouped_gradients(batch, w0, leaders=(True, True))
    assert (twice - alone).abs().max() > 0.02


# ---- end to end: 2 gloo ranks as one group against one rank with batch 2·B ---------------
def dp_recipe(tmp_path: Path, strategy: dict, privacy: dict) -> Path:
    # plain SGD: the noise moves the adapter linearly, as the tolerance assumes
    raw = tiny_recipe(tmp_path, federation={"rounds": 2, "num_clients": 4, "clients_per_round": 2},
                      strategy=strategy, privacy=privacy, eval={"every": 0},
                      client={"max_steps": 2, "per_device_train_batch_size": B, "optim": "sgd", "learning_rate": 0.05,
                              "max_grad_norm": None},
                      output={"checkpoint_every": 2})
    path = tmp_path / "dp.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def adapter(run_dir: Path) -> dict:
    return load_file(str(run_dir / "final" / "adapter_model.safetensors"))


def max_difference(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def epsilons(run_dir: Path) -> list[float]:
    return [json.loads(line)["epsilon"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


DP_SGD = {"noise_multiplier": SIGMA, "noise_seed": 3, "delta": 1e-5}


@pytest.fixture(scope="module")
def dp_sgd_runs(tmp_path_factory):
    """(recipe, {per_example: one rank's run dir at batch 2·B})."""
    path = dp_recipe(tmp_path_factory.mktemp("dpgroups"), {"name": "dp_sgd", "max_grad_norm": 1.0}, DP_SGD)
    one = {how: run_recipe(str(path), [f"strategy.per_example={how}", f"client.per_device_train_batch_size={2 * B}",
                                       f"output.name=one-{how}"]) for how in ("vmap", "loop")}
    return path, one


@pytest.mark.slow
@pytest.mark.parametrize("how, parallel", [("vmap", "ddp"), ("loop", "ddp"), ("vmap", "fsdp")])
def test_dp_sgd_in_a_group_of_two_trains_as_one_rank_with_twice_the_batch(dp_sgd_runs, how, parallel):
    # fsdp: torch.func's functional call runs through the sharded base's all-gathers
    path, one = dp_sgd_runs
    group = launch(path, 2, f"group-{how}-{parallel}", "federation.group_size=2", f"federation.group_parallel={parallel}",
                   f"strategy.per_example={how}")
    final, expected = adapter(group), adapter(one[how])
    assert final.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(final[k], expected[k], **TOLERANCE)
    # the accountant's rate is the group's batch over the client's data, as one rank's at 2·B
    assert epsilons(group) == pytest.approx(epsilons(one[how]), rel=1e-9) and epsilons(group)[0] > 0


@pytest.mark.slow
def test_the_tolerance_tells_one_noise_draw_from_two(dp_sgd_runs):
    # the same seeded draw added on both ranks of a group of 2 is one rank's run with noise 2σ:
    # the group test above would fail on it by orders of magnitude
    path, one = dp_sgd_runs
    doubled = run_recipe(str(path), [f"privacy.noise_multiplier={2 * SIGMA}", f"client.per_device_train_batch_size={2 * B}",
                                     "output.name=one-2sigma"])
    assert max_difference(adapter(doubled), adapter(one["vmap"])) > 1e3 * TOLERANCE["atol"]


@pytest.mark.slow
def test_dp_brem_in_a_group_of_two_sends_the_momentum_of_one_rank_with_twice_the_batch(tmp_path):
    path = dp_recipe(tmp_path, {"name": "dp_brem", "server_lr": 1.0, "record_clip": 1.0, "client_clip": 1.0},
                     {"noise_multiplier": SIGMA, "noise_seed": 3})
    one = run_recipe(str(path), [f"client.per_device_train_batch_size={2 * B}", "output.name=one"])
    group = launch(path, 2, "group", "federation.group_size=2")
    final, expected = adapter(group), adapter(one)
    for k in expected:
        torch.testing.assert_close(final[k], expected[k], **TOLERANCE)
    # each client's momentum, kept by the group's leader, is the one-rank run's
    stored, one_stored = ({p.name: load_file(str(p)) for p in sorted((d / "checkpoints" / "round_2" / "clients").glob("*"))}
                          for d in (group, one))
    assert stored.keys() == one_stored.keys() and stored
    for name in stored:
        for k in one_stored[name]:
            torch.testing.assert_close(stored[name][k], one_stored[name][k], **TOLERANCE)
    assert epsilons(group) == pytest.approx(epsilons(one), rel=1e-9)


# ---- what loads --------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", [{"name": "dp_sgd"}, {"name": "dp_brem"}, {"name": "dp_sgd", "inner": {"name": "fedprox"}}])
def test_per_example_dp_loads_with_a_group(tmp_path, strategy):
    from fedllm.capabilities import check_pairings
    from fedllm.recipe import Recipe

    check_pairings(Recipe.model_validate(tiny_recipe(tmp_path, federation={"group_size": 2}, strategy=strategy,
                                                     privacy={"noise_multiplier": 1.0})))

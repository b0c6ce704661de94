"""client.optim=zo: the two-point estimate along seeded directions is unbiased on a
quadratic with error ∝ 1/√samples; a client's (seed, scalar) upload rebuilds its update
exactly on the server; the pairing checks refuse what cannot run."""
import math

import numpy as np
import pytest
import torch

from fedllm.capabilities import check_pairings
from fedllm.codecs.seeded import SeededDelta, direction
from fedllm.engine import Federation
from fedllm.loops.zo import two_point
from fedllm.recipe import recipe_from_dict
from fedllm.registry import RecipeError
from fedllm.state import ClientRecord
from fedllm.wire import WireContext, serialize
from tests.conftest import tiny_recipe

SHAPES = {"a": (6, 5), "b": (20,)}  # 50 coordinates in two blocks


def quadratic():
    rng = np.random.default_rng(0)
    A = {k: torch.tensor(rng.uniform(0.5, 3.0, size=s), dtype=torch.float32) for k, s in SHAPES.items()}
    b = {k: torch.tensor(rng.normal(size=s), dtype=torch.float32) for k, s in SHAPES.items()}
    theta = {k: torch.tensor(rng.normal(size=s), dtype=torch.float32) for k, s in SHAPES.items()}
    loss = lambda offset: sum(float((0.5 * A[k] * (theta[k] + offset[k]) ** 2 + b[k] * (theta[k] + offset[k])).double().sum())  # noqa: E731
                              for k in SHAPES)
    grad = torch.cat([(A[k] * theta[k] + b[k]).flatten() for k in sorted(SHAPES)]).double()
    return loss, grad


def estimate(loss, seeds, eps=1e-2) -> torch.Tensor:
    total = torch.zeros(50, dtype=torch.float64)
    for s in seeds:
        z = direction(s, SHAPES)
        g = two_point(lambda z, scale: loss({k: scale * t for k, t in z.items()}), z, eps)
        total += g * torch.cat([z[k].flatten() for k in sorted(SHAPES)]).double()
    return total / len(seeds)


def test_directions_have_identity_covariance_and_replay_from_the_seed():
    z = torch.stack([torch.cat([t.flatten() for t in direction(s, SHAPES).values()]) for s in range(2500)]).double()
    cov = z.T @ z / len(z)
    assert (cov.diagonal() - 1).abs().max() < 0.12 and (cov - torch.diag(cov.diagonal())).abs().max() < 0.12  # ±4.5σ
    assert all(torch.equal(direction(7, SHAPES)[k], direction(7, SHAPES)[k]) for k in SHAPES)


def test_two_point_estimate_is_unbiased_with_error_shrinking_as_one_over_root_samples():
    loss, grad = quadratic()
    rms = {}
    for n in (4, 64):
        errors = [float((estimate(loss, range(10**6 * n + r * n, 10**6 * n + (r + 1) * n)) - grad).norm())
                  for r in range(12)]
        rms[n] = math.sqrt(np.mean(np.square(errors)))
    slope = math.log(rms[64] / rms[4]) / math.log(64 / 4)
    print(f"rms error n=4: {rms[4]:.3f}, n=64: {rms[64]:.3f}, slope {slope:.3f} (1/√n: −0.5)")
    assert abs(slope + 0.5) < 0.1
    # unbiased: the mean of 12·64 fresh draws is within 3 standard errors of ∇f
    pooled = estimate(loss, range(12 * 64))
    assert float((pooled - grad).norm()) < 3 * rms[64] / math.sqrt(12)


@pytest.fixture(scope="module")
def zo_fed(tmp_path_factory):
    path = tmp_path_factory.mktemp("zo")
    recipe = recipe_from_dict(tiny_recipe(path, client={"optim": "zo", "max_steps": 4, "learning_rate": 0.01}))
    check_pairings(recipe)
    return Federation(recipe, path / "run")


def test_the_seed_scalar_upload_rebuilds_the_clients_update_exactly(zo_fed):
    fed = zo_fed
    upload = fed.client.run(1, 0, fed.global_state, {}, ClientRecord(), 0.01)
    assert isinstance(upload.update, SeededDelta) and len(upload.update.seeds) == 4
    moved = {k: p.detach().float() - fed.global_state[k].float() for k, p in fed.params.items()}
    assert sum(float(t.abs().sum()) for t in moved.values()) > 0  # it trained
    ctx = WireContext(0, 1, fed.recipe.seed)
    wire = serialize(upload.update.message())
    received, size = fed.channel.up(upload.update, upload.extras, ctx, {})
    assert size == len(wire) < 600  # 4 seeds and 4 scalars, whatever the adapter's size
    for k in fed.global_state:
        assert torch.equal(received.delta[k], upload.update[k])  # bit for bit
        torch.testing.assert_close(received.delta[k], moved[k], rtol=0, atol=1e-6)  # the client's trained weights
    dense = sum(t.numel() for t in fed.global_state.values()) * 4
    print(f"zo upload {size} bytes vs {dense} bytes of fp32 adapter")


@pytest.mark.slow
def test_a_zo_round_runs_through_the_engine_with_uploads_of_a_few_hundred_bytes(zo_fed):
    fed = zo_fed
    first = fed.run_round(0)
    assert all(s.accepted for s in first.stats) and all(s.bytes_up < 600 for s in first.stats)


def test_pairings_refuse_gradient_hooks_and_own_wire_formats(tmp_path):
    with pytest.raises(RecipeError, match="fedprox"):
        check_pairings(recipe_from_dict(tiny_recipe(tmp_path, client={"optim": "zo"}, strategy={"name": "fedprox"})))
    raw = tiny_recipe(tmp_path, client={"optim": "zo"})
    raw["adapter"] = {"name": "ferret"}
    with pytest.raises(RecipeError, match="ferret"):
        check_pairings(recipe_from_dict(raw))

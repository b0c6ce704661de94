"""The strategy zoo in the engine: exact resume with per-client state, a robust rule with
attackers under two ranks (gathered messages, shared client store) equal to one rank, and
robust rules holding up against sign-flipping clients where FedAvg does not."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedllm.engine import resume_run, run_recipe
from fedllm.state import checkpoint_dirs, read_checkpoint

TRAIN = str(Path(__file__).resolve().parents[2] / "scripts" / "train.py")


@pytest.fixture(autouse=True)
def one_thread():
    # the tiny preset runs fastest on one thread; on a busy 2-core machine several intra-op
    # threads spin against each other and a 2 s run takes a minute
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def final_adapter(run_dir):
    return load_file(str(run_dir / "final" / "adapter_model.safetensors"))


def assert_same(a, b):
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("strategy", [{"name": "scaffold"}, {"name": "fedspeed", "rho": 0.05, "lam": 0.1}], ids=lambda s: s["name"])
def test_resuming_mid_run_ends_where_the_uninterrupted_run_ends(recipe_file, strategy):
    path = recipe_file(
        strategy=strategy, federation={"rounds": 4, "num_clients": 4, "clients_per_round": 2},
        client={"optim": "sgd", "learning_rate": 0.05, "max_steps": 3}, eval={"every": 0},
    )
    reference = final_adapter(run_recipe(str(path)))
    halted = run_recipe(str(path), ["federation.rounds=2", "output.name=halted"])
    parts, _ = read_checkpoint(checkpoint_dirs(halted)[-1])
    # what a resume must restore: the server's c / Σh and every client's c_i / h_i
    assert any(t.abs().sum() > 0 for t in parts["server_state"].values())
    assert len(list((checkpoint_dirs(halted)[-1] / "clients").glob("client_*.safetensors"))) >= 2
    resume_run(str(halted), ["federation.rounds=4"])
    assert_same(final_adapter(halted), reference)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_robust_rule_with_attackers_on_two_ranks_gives_the_one_rank_result(recipe_file, tmp_path):
    path = recipe_file(
        federation={"rounds": 2, "num_clients": 5, "clients_per_round": 5},
        strategy={"name": "trimmed_mean", "f": 1, "nnm": True, "momentum": 0.5},
        byzantine={"name": "alie", "count": 1},
        eval={"every": 0},
    )
    one = final_adapter(run_recipe(str(path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", TRAIN, str(path), "output.name=two"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    two = final_adapter(tmp_path / "runs" / "two")
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-7)
    # every client's momentum went through the store the ranks share
    clients = checkpoint_dirs(tmp_path / "runs" / "two")[-1] / "clients"
    assert len(list(clients.glob("client_*.safetensors"))) == 5


def eval_loss(recipe_file, name, strategy, byzantine=None):
    sections = dict(
        strategy=strategy, federation={"rounds": 4, "num_clients": 10, "clients_per_round": 10},
        client={"max_steps": 4, "learning_rate": 0.01}, eval={"every": 0}, output={"name": name, "checkpoint_every": 0},
    )
    if byzantine:
        sections["byzantine"] = byzantine
    path = recipe_file(**sections)
    run_dir = run_recipe(str(path))
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["eval_loss"]


@pytest.mark.slow
def test_twenty_percent_sign_flippers_break_fedavg_but_not_median_or_nnm_trimmed_mean(recipe_file):
    # the tiny version of scripts/byzantine_experiment.py: 2 of 10 clients send −4·Δ every round
    attack = {"name": "sign_flip", "count": 2, "scale": 4.0}
    clean = eval_loss(recipe_file, "clean", {"name": "fedavg"})
    assert eval_loss(recipe_file, "fedavg", {"name": "fedavg"}, attack) > 1.2 * clean
    for name, rule in [("median", {"name": "median", "f": 2}), ("nnm", {"name": "trimmed_mean", "f": 2, "nnm": True})]:
        assert eval_loss(recipe_file, name, rule, attack) < 1.1 * clean, name

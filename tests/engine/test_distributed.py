"""Two CPU processes (gloo, launched like accelerate/torchrun) end where one process ends."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from fedllm.engine import run_recipe
from tests.conftest import tiny_recipe

TRAIN = str(Path(__file__).resolve().parents[2] / "scripts" / "train.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_processes(recipe, name):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={free_port()}", TRAIN, str(recipe), f"output.name={name}",
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_two_ranks_give_the_one_rank_result(recipe_file, tmp_path):
    path = recipe_file(federation={"rounds": 2, "num_clients": 5, "clients_per_round": 3}, strategy={"name": "fedavgm"})
    one = load_file(str(run_recipe(str(path)) / "final" / "adapter_model.safetensors"))
    launch_two_processes(path, "two")
    two_dir = tmp_path / "runs" / "two"
    two = load_file(str(two_dir / "final" / "adapter_model.safetensors"))
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-7)
    # rank 0 logged every client of every round, each exactly once
    ledger = (two_dir / "ledger.jsonl").read_text().splitlines()
    assert len(ledger) == 2 * 3


@pytest.mark.parametrize("seed_pool", ["per_client", "shared"])
def test_ferret_coordinate_sums_on_two_ranks_give_the_one_rank_weights(tmp_path, seed_pool):
    # per_client: every rank gathers the other's (seeds, coordinates); shared: one all-reduced sum
    raw = tiny_recipe(tmp_path, federation={"rounds": 2, "num_clients": 5, "clients_per_round": 3},
                      client={"max_steps": 2, "optim": "sgd", "learning_rate": 0.05})
    path = tmp_path / "ferret.yaml"
    path.write_text(yaml.safe_dump({**raw, "adapter": {"name": "ferret", "k": 6, "seed_pool": seed_pool}}))
    one_dir = run_recipe(str(path))
    launch_two_processes(path, "two")
    one = load_file(str(one_dir / "final" / "model.safetensors"))
    two = load_file(str(tmp_path / "runs" / "two" / "final" / "model.safetensors"))
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-7)
    ledger_one = (one_dir / "ledger.jsonl").read_text().splitlines()
    ledger_two = (tmp_path / "runs" / "two" / "ledger.jsonl").read_text().splitlines()
    assert sorted(ledger_one) == sorted(ledger_two)  # the same bytes up and down, client by client


def _broadcast_worker(rank, port, out):
    import torch.distributed as dist

    from fedllm.distributed import broadcast_state_

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    # a secret generator state drawn independently on each rank, as a DP strategy's init does
    state = {"noise": torch.Generator().manual_seed(1000 + rank).get_state(), "m": torch.full((3,), float(rank))}
    broadcast_state_(state, torch.device("cpu"))
    save_file({k: t.contiguous() for k, t in state.items()}, f"{out}/rank{rank}.safetensors")
    dist.destroy_process_group()


def test_every_rank_starts_from_rank_zeros_server_state(tmp_path):
    torch.multiprocessing.spawn(_broadcast_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    zero, one = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert torch.equal(one["noise"], torch.Generator().manual_seed(1000).get_state()) and torch.equal(one["m"], zero["m"])


@pytest.mark.slow
def test_a_frozen_rank_ends_the_job_after_the_collective_timeout():
    import time

    worker = str(Path(__file__).with_name("timeout_worker.py"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(TRAIN).parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", worker, "3"]
    start = time.time()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=110)
    assert out.returncode != 0 and "rank 0 gave up after" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    assert time.time() - start < 60  # not torch's 30 minutes, and not the frozen rank's 120 s

"""Two CPU processes (gloo, launched like accelerate/torchrun) end where one process ends."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedllm.engine import run_recipe

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

"""FederatedCallback in two CPU processes (gloo): each rank a client with its own data,
training with a plain transformers.Trainer. One launch runs every scenario (tests/
integrations/trainer_worker.py); the tests read what each rank recorded."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedllm.wire import Message, serialize

WORKER = str(Path(__file__).with_name("trainer_worker.py"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", WORKER, str(out), "federated", "controls", "resume", "private"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]

    def read(name: str):
        return [load_file(str(out / f"{name}_rank{r}.safetensors")) for r in (0, 1)]

    read.log = lambda name: json.loads((out / f"{name}_log.json").read_text())  # noqa: E731
    return read


def section(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: t for k, t in state.items() if k.startswith(prefix)}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_every_sync_ends_with_identical_weights_equal_to_the_fedavg_of_the_local_results(runs):
    r0, r1 = runs("fedavg")
    n0, n1 = r0["num_samples"].item(), r1["num_samples"].item()
    assert n0 != n1  # the two clients have different data (and so different FedAvg weights)
    for step in (2, 4, 6):  # local_steps=2, max_steps=6: three rounds
        g0, g1 = section(r0, f"global/{step}/"), section(r1, f"global/{step}/")
        assert all(torch.equal(g0[k], g1[k]) for k in g0)
        l0, l1 = section(r0, f"local/{step}/"), section(r1, f"local/{step}/")
        fedavg = {k: (n0 * l0[k].double() + n1 * l1[k].double()) / (n0 + n1) for k in l0}
        assert max_diff({k: t.double() for k, t in g0.items()}, fedavg) < 1e-7
    assert max_diff(section(r0, "final/"), section(r1, "final/")) == 0.0


def test_local_steps_between_syncs_are_local(runs):
    r0, r1 = runs("fedavg")
    for step in (2, 4, 6):  # just before each sync the clients differ: DDP did not average their gradients
        assert max_diff(section(r0, f"local/{step}/"), section(r1, f"local/{step}/")) > 1e-4
    # the callback's sync switch-off without its rounds: the clients drift apart for good
    n0, n1 = runs("nosync")
    assert max_diff(section(n0, "final/"), section(n1, "final/")) > 1e-3
    # and without the callback, DDP averages every step's gradients: identical ranks
    d0, d1 = runs("ddp")
    assert max_diff(section(d0, "final/"), section(d1, "final/")) == 0.0


def test_the_ledger_and_round_metrics_go_to_the_trainer_logs(runs):
    rounds = [row for row in runs.log("fedavg") if "fed/round" in row]
    assert [row["fed/round"] for row in rounds] == [1, 2, 3] and [row["step"] for row in rounds] == [2, 4, 6]
    # FedAvg + LoRA: each client uploads its whole A and B update and downloads x^t, as real bytes
    update = section(runs("fedavg")[0], "final/")
    one_message = len(serialize(Message(update)))
    assert all(row["fed/bytes_up"] == row["fed/bytes_down"] == 2 * one_message for row in rounds)
    assert all(row["fed/clients"] == 2 for row in rounds)


def test_a_run_resumed_from_a_mid_round_trainer_checkpoint_equals_the_uninterrupted_run(runs):
    # SCAFFOLD (server c, client c_i, gradient hooks), checkpoint at step 3 of rounds of 2 steps
    full, resumed = runs("full"), runs("resumed")
    for rank in (0, 1):
        assert max_diff(section(full[rank], "final/"), section(resumed[rank], "final/")) == 0.0
        assert max_diff(section(full[rank], "server/"), section(resumed[rank], "server/")) == 0.0
    assert max_diff(section(full[0], "server/"), {k: torch.zeros_like(t) for k, t in section(full[0], "server/").items()}) > 0


def test_ffa_lora_with_fedprox_trains_and_sends_only_b(runs):
    f0, f1 = runs("ffa")
    assert max_diff(section(f0, "final/"), section(f1, "final/")) == 0.0  # 7 steps: a last 1-step round synced
    assert all(".lora_B." in k for k in section(f0, "final/"))
    init = section(f0, "init/")
    assert max(t.abs().max().item() for t in section(f0, "final/").values()) > 1e-4 and all(
        not t.any() for t in init.values())  # B moved from its zero init
    rounds = [row for row in runs.log("ffa") if "fed/round" in row]
    assert [row["step"] for row in rounds] == [3, 6, 7]
    b_only = len(serialize(Message(section(f0, "final/"))))
    assert all(row["fed/bytes_up"] == 2 * b_only for row in rounds)
    for f in (f0, f1):  # the shared seeded A, never trained
        assert max_diff(section(f, "a/"), section(f, "a_init/")) == 0.0


def test_dp_fedavg_takes_its_budget_from_the_privacy_section_and_ranks_share_the_secret_noise(runs):
    r0, r1 = runs("dp")
    for step in (2, 4):
        g0, g1 = section(r0, f"global/{step}/"), section(r1, f"global/{step}/")
        assert all(torch.equal(g0[k], g1[k]) for k in g0)  # the same noise on both ranks
        l0, l1 = section(r0, f"local/{step}/"), section(r1, f"local/{step}/")
        assert max_diff(g0, l0) > 0 and max_diff(g0, l1) > 0
    epsilons = [row["fed/epsilon"] for row in runs.log("dp") if "fed/epsilon" in row]
    assert len(epsilons) == 2 and 0 < epsilons[0] < epsilons[1]  # accounted, and growing per round

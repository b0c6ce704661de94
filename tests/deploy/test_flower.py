"""A federation deployed on Flower: real SuperLink and SuperNodes on localhost, TLS and
SuperNode authentication on, started and stopped by process id. Needs `fedllm[flower]`;
skipped without it (CI installs only `.[test]`: Flower's runtime is a heavy install and
these runs take minutes — run them with `pip install -e '.[test,flower]'`)."""
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save

pytest.importorskip("flwr", reason="the Flower deployment tests need the extra: pip install 'fedllm[flower]'")

from fedllm.deploy.launch import stop  # noqa: E402
from fedllm.deploy.localhost import LocalFederation  # noqa: E402
from fedllm.engine import run_recipe  # noqa: E402
from fedllm.metrics import read_jsonl  # noqa: E402

QUICKSTART = str(Path(__file__).parents[2] / "recipes" / "quickstart.yaml")
RUN_TIMEOUT_S = 900


def quickstart(root: Path, name: str, rounds: int, **more) -> list[str]:
    """recipes/quickstart.yaml as 2 parties, both sampled each round, with per-client optimizer state."""
    options = {
        "federation.rounds": rounds, "federation.num_clients": 2, "federation.clients_per_round": 2,
        "client.max_steps": 2, "client.keep_optimizer_state": True, "eval.max_batches": 2,
        "output.dir": root / "runs", "output.name": name, "output.progress": False, "output.checkpoint_every": 1, **more,
    }
    return [f"{k}={v}" for k, v in options.items()]


def ledger(run_dir: Path) -> list[tuple]:
    return [(r["round"], r["client"], r["bytes_up"], r["bytes_down"]) for r in read_jsonl(run_dir / "ledger.jsonl")]


def loads(fed: LocalFederation, i: int) -> int:
    return json.loads((fed.state_dir(i) / "party.json").read_text())["base_model_loads"]


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT_S + 300)
def test_two_parties_over_tls_train_exactly_what_the_simulation_trains(tmp_path):
    fed = LocalFederation(QUICKSTART, quickstart(tmp_path, "deployed", 3), tmp_path).start()
    try:
        assert fed.wait(RUN_TIMEOUT_S) == 0, fed.log_of("serve.log")[-3000:]
    finally:
        fed.stop()
    deployed = tmp_path / "runs" / "deployed"
    simulated = run_recipe(QUICKSTART, quickstart(tmp_path, "simulated", 3))
    a = load_file(str(deployed / "checkpoints" / "round_3" / "global.safetensors"))
    b = load_file(str(simulated / "checkpoints" / "round_3" / "global.safetensors"))
    assert a.keys() == b.keys()
    # same sampling, seeds, data order and summation order: identical up to float32 rounding (measured: 0.0)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert any(not torch.equal(a[k], load_file(str(deployed / "checkpoints" / "round_2" / "global.safetensors"))[k])
               for k in a)  # the last round did train
    assert ledger(deployed) == ledger(simulated)  # the same Channel bytes, up and down
    assert "Uvicorn running on https://" in (deployed / "superlink.log").read_text()  # TLS
    for i in (0, 1):
        assert loads(fed, i) == 1  # one base-model load per party for the whole run
        # the party's optimizer moments stayed on its own disk, one record per round it trained
        records = sorted(p.name for p in (fed.state_dir(i) / "records").glob("round_*.safetensors"))
        assert records and "round_2.safetensors" in records


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT_S + 300)
def test_a_party_that_crashes_mid_round_is_recorded_missing_and_rejoins(tmp_path):
    fed = LocalFederation(QUICKSTART, quickstart(tmp_path, "crash", 5, **{"federation.round_timeout_s": 60}),
                          tmp_path).start()
    metrics = tmp_path / "runs" / "crash" / "metrics.jsonl"
    try:
        # party 1 dies once its round-1 download has arrived (round 0 was the first train message)
        fed.until(lambda: fed.log_of("party_1/supernode.log").count("Receiving: train message") >= 2, 600,
                  "party 1 receiving round 1")
        fed.crash(1)
        fed.until(lambda: len(read_jsonl(metrics)) >= 2, 300, "round 1 ending")
        fed.join(1)  # the party comes back with its state directory
        assert fed.wait(RUN_TIMEOUT_S) == 0, fed.log_of("serve.log")[-3000:]
    finally:
        fed.stop()
    rows = read_jsonl(metrics)
    assert len(rows) == 5 and rows[1]["missing_clients"] == [1] and rows[1]["dropped"] == 1
    assert rows[1]["train_loss"] is not None  # round 1 aggregated party 0's update
    entries = read_jsonl(tmp_path / "runs" / "crash" / "ledger.jsonl")
    assert [e["client"] for e in entries if e["round"] == 2 and "missing" in e] == [1]  # rows count from 1
    rejoined = [e["round"] for e in entries if e["client"] == 1 and e["round"] >= 3 and "missing" not in e]
    assert rejoined and all(e["bytes_up"] > 0 for e in entries if e["client"] == 1 and e["round"] in rejoined)
    assert "client 1 dropped out" in (tmp_path / "runs" / "crash" / "server.log").read_text()


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT_S + 300)
def test_a_killed_server_resumes_from_its_checkpoint_with_the_parties_reconnecting(tmp_path):
    fed = LocalFederation(QUICKSTART, quickstart(tmp_path, "resumed", 3), tmp_path).start()
    run_dir = tmp_path / "runs" / "resumed"
    try:
        fed.until(lambda: (run_dir / "checkpoints" / "round_1").exists(), 900, "the round-1 checkpoint")
        stop(fed.server)  # the server side goes down: SuperLink, ServerApp and all
        fed.serve(resume=run_dir)
        assert fed.wait(RUN_TIMEOUT_S) == 0, fed.log_of("serve.log")[-3000:]
    finally:
        fed.stop()
    simulated = run_recipe(QUICKSTART, quickstart(tmp_path, "simulated", 3))
    a = load_file(str(run_dir / "checkpoints" / "round_3" / "global.safetensors"))
    b = load_file(str(simulated / "checkpoints" / "round_3" / "global.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert [r["round"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3]
    assert all(loads(fed, i) == 1 for i in (0, 1))  # the parties stayed up: no reload

"""A federation deployed on Flower: real SuperLink and SuperNodes on localhost, TLS and
SuperNode authentication on, started and stopped by process id. Needs `fedllm[flower]`;
skipped without it (`pip install -e '.[test,flower]'`). The two parties start once for the
module and serve both tests' runs in turn (a party may join several runs of one recipe), so
the module pays their start-up once."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("flwr", reason="the Flower deployment tests need the extra: pip install 'fedllm[flower]'")

from fedllm.deploy.processes import stop  # noqa: E402
from fedllm.deploy.localhost import LocalFederation  # noqa: E402
from fedllm.engine import run_recipe  # noqa: E402
from fedllm.metrics import read_jsonl  # noqa: E402

QUICKSTART = str(Path(__file__).parents[2] / "recipes" / "quickstart.yaml")
RUN_TIMEOUT_S = 900
CRASH_ROUNDS = 5  # the crash in round 1, then room for the party's restart (a model load) before the last round
# recipes/quickstart.yaml as 2 parties, both sampled each round, with per-client optimizer state
SHARED = {"federation.num_clients": 2, "federation.clients_per_round": 2, "client.max_steps": 2,
          "client.keep_optimizer_state": True, "eval.max_batches": 2}


def options(root: Path, name: str, rounds: int, **more) -> list[str]:
    """One run's own settings (the parties' recipe is the same for every run: SHARED)."""
    run = {"federation.rounds": rounds, "output.dir": root / "runs", "output.name": name, "output.progress": False,
           "output.checkpoint_every": 1, **more}
    return [f"{k}={v}" for k, v in run.items()]


def ledger(run_dir: Path) -> list[tuple]:
    return [(r["round"], r["client"], r["bytes_up"], r["bytes_down"]) for r in read_jsonl(run_dir / "ledger.jsonl")]


def loads(fed: LocalFederation, i: int) -> int:
    return json.loads((fed.state_dir(i) / "party.json").read_text())["base_model_loads"]


@pytest.fixture(scope="module")
def parties(tmp_path_factory):
    """Two parties (workers + SuperNodes) that keep trying to reach the module's SuperLink port."""
    root = tmp_path_factory.mktemp("federation")
    fed = LocalFederation(QUICKSTART, [f"{k}={v}" for k, v in SHARED.items()], root)
    for i in range(fed.parties):
        fed.join(i)
    yield fed
    fed.stop()


@pytest.mark.slow
@pytest.mark.timeout(2 * RUN_TIMEOUT_S)
def test_two_parties_over_tls_train_what_the_simulation_trains_through_a_server_restart(parties, tmp_path):
    fed, run_dir = parties, tmp_path / "runs" / "deployed"
    # no eval cap: the parties' shares of the held-out rows (fedllm split) then add up to the simulation's eval set
    fed.serve(overrides=options(tmp_path, "deployed", 3, **{"eval.max_batches": "null"}))
    fed.until(lambda: (run_dir / "checkpoints" / "round_1").exists(), RUN_TIMEOUT_S, "the round-1 checkpoint")
    stop(fed.server)  # the server side goes down after round 1: SuperLink, ServerApp and all
    fed.serve(resume=run_dir)  # and continues from its checkpoint; the parties reconnect by themselves
    assert fed.wait(RUN_TIMEOUT_S) == 0, fed.log_of("serve.log")[-3000:]
    simulated = run_recipe(QUICKSTART, [f"{k}={v}" for k, v in SHARED.items()] +
                           options(tmp_path, "simulated", 3, **{"eval.max_batches": "null"}))
    a = load_file(str(run_dir / "checkpoints" / "round_3" / "global.safetensors"))
    b = load_file(str(simulated / "checkpoints" / "round_3" / "global.safetensors"))
    assert a.keys() == b.keys()
    # same sampling, seeds, data order and summation order: identical up to float32 rounding (measured: 0.0)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert any(not torch.equal(a[k], load_file(str(run_dir / "checkpoints" / "round_2" / "global.safetensors"))[k])
               for k in a)  # the last round did train
    rows, simulated_rows = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(simulated / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2, 3]
    # the server holds no data: its eval is the parties' own evals pooled token-weighted, which equals the
    # simulation's pooled eval here (every held-out row scored once; other batching: float rounding only).
    # With eval.max_batches each party scores its first batches, the simulation the pooled set's: they differ.
    assert rows[2]["eval_loss"] == pytest.approx(simulated_rows[2]["eval_loss"], rel=1e-5)
    assert rows[2]["token_accuracy"] == pytest.approx(simulated_rows[2]["token_accuracy"], rel=1e-9)
    assert json.loads((run_dir / "run_meta.json").read_text())["client_sizes"] == json.loads(
        (simulated / "run_meta.json").read_text())["client_sizes"]  # reported by the parties, as the simulation's
    assert ledger(run_dir) == ledger(simulated)  # the same Channel bytes, up and down
    assert "Uvicorn running on https://" in (run_dir / "superlink.log").read_text()  # TLS
    assert "client 0 is node" in (run_dir / "server.log").read_text()  # known by its key
    for i in (0, 1):
        assert loads(fed, i) == 1  # one base-model load per party, through the server's restart
        # the party's optimizer moments stayed on its own disk, one record per round it trained
        records = sorted(p.name for p in (fed.state_dir(i) / "records").glob("round_*.safetensors"))
        assert records and "round_2.safetensors" in records


@pytest.mark.slow
@pytest.mark.timeout(2 * RUN_TIMEOUT_S)
def test_a_party_that_crashes_mid_round_is_recorded_missing_and_rejoins(parties, tmp_path):
    fed, run_dir = parties, tmp_path / "runs" / "crash"
    received = fed.log_of("party_1/supernode.log").count("Receiving: train message")
    fed.serve(overrides=options(tmp_path, "crash", CRASH_ROUNDS, **{"federation.round_timeout_s": 45}))
    # party 1 dies once its round-1 download has arrived (round 0 was its first train message of this run)
    fed.until(lambda: fed.log_of("party_1/supernode.log").count("Receiving: train message") >= received + 2,
              RUN_TIMEOUT_S, "party 1 receiving round 1")
    fed.crash(1)
    fed.until(lambda: len(read_jsonl(run_dir / "metrics.jsonl")) >= 2, RUN_TIMEOUT_S, "round 1 ending")
    fed.join(1)  # the party comes back with its state directory
    assert fed.wait(RUN_TIMEOUT_S) == 0, fed.log_of("serve.log")[-3000:]
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert len(rows) == CRASH_ROUNDS and rows[1]["missing_clients"] == [1] and rows[1]["dropped"] == 1
    assert rows[1]["train_loss"] is not None  # round 1 aggregated party 0's update
    entries = read_jsonl(run_dir / "ledger.jsonl")
    assert [e["client"] for e in entries if e["round"] == 2 and "missing" in e] == [1]  # rows count from 1
    # back for a later round: the next one if its restart (a worker's model load, a SuperNode) fits in
    # round_timeout_s; on a loaded machine (load 10 on 2 cores: 85 s) a few rounds later
    back = [e for e in entries if e["client"] == 1 and e["round"] >= 3 and "missing" not in e]
    assert back and all(e["bytes_up"] > 0 for e in back) and back[-1]["round"] == CRASH_ROUNDS
    assert "client 1 dropped out" in (run_dir / "server.log").read_text()

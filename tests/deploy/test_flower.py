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


# ---- tampered uploads, through the server's real round with a stand-in Grid ---------------
def tampered(wire: bytes, how: str) -> bytes:
    from fedllm.wire import deserialize

    message = deserialize(wire)
    tensors = dict(message.tensors)
    key = sorted(tensors)[0]
    if how == "wrong shape":
        tensors[key] = torch.zeros(tensors[key].shape[0] + 1, *tensors[key].shape[1:])
    elif how == "extra key":
        tensors["evil"] = torch.ones(3)
    elif how == "nan":
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = float("nan")
    elif how == "100x too large":
        tensors["padding"] = torch.zeros(100 * sum(t.numel() for t in tensors.values()))
    elif how == "not a message":
        return b"\x00" * 64
    return save(tensors, metadata={"fedllm": json.dumps(message.meta)} if message.meta else None)


class StandInGrid:
    """Two nodes whose parties are real `Party` workers; node 11's upload is tampered."""

    def __init__(self, parties: dict, how: str):
        self.parties, self.how, self.replies = parties, how, {}

    def get_node_ids(self):
        return list(self.parties)

    def push_messages(self, messages):
        from flwr.app import ConfigRecord, Message, RecordDict

        from fedllm.deploy.flower.records import read_bytes, wire_record

        for m in messages:
            m.metadata.__dict__["_message_id"] = str(len(self.replies))  # as Flower's push sets it
            party = self.parties[m.metadata.dst_node_id]
            if m.metadata.message_type == "query":
                content = RecordDict({"party": ConfigRecord({"info": json.dumps(party.identify())})})
            else:
                stats, out = party.train(json.loads(str(m.content["job"]["job"])), read_bytes(m.content["down"]))
                if m.metadata.dst_node_id == 11 and self.how == "silent":
                    continue  # it never answers
                if m.metadata.dst_node_id == 11:
                    out = tampered(out, self.how)
                content = RecordDict({"up": wire_record(out), "stats": ConfigRecord({"stats": json.dumps(stats)})})
            self.replies[m.metadata.message_id] = Message(content, reply_to=m)
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in message_ids if i in self.replies]


def stand_in_federation(recipe_file, tmp_path, monkeypatch, **federation):
    from flwr.supercore.task_identity import TaskIdentity

    from fedllm.deploy.flower.server_app import DeployedFederation
    from fedllm.deploy.launch import split_for_parties
    from fedllm.deploy.party import Party
    from fedllm.recipe import load_recipe

    for name in ("_run_id", "_task_id", "_node_id"):  # Flower's identity of the process a Message is made in
        monkeypatch.setattr(TaskIdentity, name, 1)
    path = recipe_file(federation={"rounds": 5, "num_clients": 2, "clients_per_round": 2, **federation},
                       client={"max_steps": 1})
    recipe = load_recipe(path)
    files = split_for_parties(str(path), [], tmp_path / "data")
    parties = {10 + i: Party(recipe, str(files[i]), i, tmp_path / f"party_{i}") for i in (0, 1)}
    fed = DeployedFederation(recipe, tmp_path / "runs" / "run", StandInGrid(parties, "none"))
    fed.start()
    return fed


@pytest.mark.slow
def test_a_tampered_upload_is_rejected_and_the_round_goes_on(recipe_file, tmp_path, monkeypatch, caplog):
    fed = stand_in_federation(recipe_file, tmp_path, monkeypatch)
    kinds = ["wrong shape", "extra key", "nan", "100x too large", "not a message"]
    for t, how in enumerate(kinds):
        fed.grid.how = how
        before = {k: v.clone() for k, v in fed.global_state.items()}
        with caplog.at_level(logging.WARNING, logger="fedllm"):
            result = fed.run_round(t)
        assert [(s["client"], s["accepted"]) for s in result.stats] == [(0, True), (1, False)], how
        assert "client 1 sent" in caplog.text  # logged, named
        assert any(not torch.equal(before[k], result.global_state[k]) for k in before)  # party 0's update went in
        assert all(torch.isfinite(v).all() for v in result.global_state.values())
        fed.global_state, fed.server_state = result.global_state, result.server_state
        caplog.clear()
    assert fed.state_round(0) == len(kinds) - 1 and fed.state_round(1) == -1  # a rejected party's state did not advance


@pytest.mark.slow
def test_a_silent_party_is_recorded_missing_and_too_few_answers_stop_the_run(recipe_file, tmp_path, monkeypatch):
    from fedllm.registry import RecipeError

    fed = stand_in_federation(recipe_file, tmp_path, monkeypatch, round_timeout_s=1.0, join_timeout_s=1.0)
    fed.grid.how = "silent"
    result = fed.run_round(0)
    assert [(s["client"], s["accepted"], s.get("missing")) for s in result.stats] == [
        (0, True, None), (1, False, "no answer within federation.round_timeout_s=1")]
    fed.recipe.federation.min_clients = 2
    with pytest.raises(RecipeError, match="1 of the 2 sampled parties answered .* fewer than federation.min_clients=2"):
        fed.run_round(1)

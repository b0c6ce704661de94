"""The deployed server's round (server_app.DeployedFederation) against a stand-in Grid whose
nodes are real `Party` workers: tampered uploads, silent or failing parties, min_clients
retries, client ids bound to the parties' keys, the parties' size reports and federated
evaluation. The server's recipe points at data that does not exist on the server. Needs
Flower's message types (the extra), not its network."""
import json
import logging
import time

import pytest
import torch
import yaml
from safetensors.torch import save

pytest.importorskip("flwr", reason="the Flower deployment tests need the extra: pip install 'fedllm[flower]'")

from flwr.app import ConfigRecord, Error, Message, RecordDict  # noqa: E402
from flwr.common.constant import ErrorCode  # noqa: E402

from fedllm.deploy.certs import make_certificates  # noqa: E402
from fedllm.deploy.flower.records import read_bytes, wire_record  # noqa: E402
from fedllm.deploy.launch import bind_parties, public_key_pem  # noqa: E402
from fedllm.registry import RecipeError  # noqa: E402
from fedllm.wire import deserialize  # noqa: E402


def tampered(wire: bytes, how: str) -> bytes:
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
    elif how.startswith("all "):  # every entry of the update one large, finite number: "all 1e6"
        tensors = {k: torch.full_like(t, float(how[4:])) if t.is_floating_point() else t for k, t in tensors.items()}
    return save(tensors, metadata={"fedllm": json.dumps(message.meta)} if message.meta else None)


FAILURES = {"fails once": (ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "WorkerDown: the party's worker is not running"),
            "unavailable once": (ErrorCode.NODE_UNAVAILABLE, "Node Unavailable")}


class NodeInfo:  # what Grid.get_nodes() tells the ServerApp about a node (Flower's NodeInfo fields we read)
    def __init__(self, node_id: int, public_key: bytes):
        self.node_id, self.public_key = node_id, public_key


class StandInGrid:
    """Nodes 10 and 11 whose parties are real `Party` workers, each authenticated by a key;
    node 11 misbehaves as `how` says: a tampered upload, silence, a late answer, a failure;
    and reports the numbers in `forged` instead of its own."""

    def __init__(self, parties: dict, keys: dict, how: str = "none"):
        self.parties, self.keys, self.how, self.forged = parties, keys, how, {}
        self.replies, self.pushed = {}, {node: 0 for node in parties}  # message id -> (due time, reply)
        self.asked, self.reports = [], {}  # (node, message type) of other messages; forged size reports

    def get_node_ids(self):
        return list(self.parties)

    def get_nodes(self):
        return [NodeInfo(node, self.keys[node]) for node in self.parties]

    def push_messages(self, messages):
        for m in messages:
            m.metadata.__dict__["_message_id"] = str(len(self.replies) + sum(self.pushed.values()))  # as Flower's push sets it
            node, due = m.metadata.dst_node_id, time.time()
            if m.metadata.message_type != "train":  # a size query or an eval, as the ClientApp relays it
                self.asked.append((node, m.metadata.message_type))
                if node == 11 and self.how == f"silent {m.metadata.message_type}":
                    continue
                job = json.loads(str(m.content["job"]["job"]))
                try:
                    stats = (self.parties[node].sizes(job) if m.metadata.message_type == "query.sizes" else
                             self.parties[node].evaluate(job, read_bytes(m.content["down"])))
                except RecipeError as err:
                    self.replies[m.metadata.message_id] = (due, Message(Error(0, str(err)), reply_to=m))
                    continue
                stats = self.reports.get(node, stats) if m.metadata.message_type == "query.sizes" else stats
                content = RecordDict({"stats": ConfigRecord({"stats": json.dumps(stats)})})
                self.replies[m.metadata.message_id] = (due, Message(content, reply_to=m))
                continue
            self.pushed[node] += 1
            try:
                stats, out = self.parties[node].train(json.loads(str(m.content["job"]["job"])),
                                                      read_bytes(m.content["down"]))
            except RecipeError as err:  # the party refused the job: Flower replies with its ClientApp's error
                self.replies[m.metadata.message_id] = (due, Message(Error(0, str(err)), reply_to=m))
                continue
            if node == 11 and self.how == "silent":
                continue  # it never answers
            if node == 11 and self.how in FAILURES:  # its worker was down, or its node; back for the next message
                code, reason = FAILURES[self.how]
                self.how = "none"
                self.replies[m.metadata.message_id] = (due, Message(Error(code, reason), reply_to=m))
                continue
            if node == 11:
                stats = {**stats, **self.forged}
            if node == 11 and self.how == "late":
                due += 1.5
            elif node == 11 and self.how != "none":
                out = tampered(out, self.how)
            content = RecordDict({"up": wire_record(out), "stats": ConfigRecord({"stats": json.dumps(stats)})})
            self.replies[m.metadata.message_id] = (due, Message(content, reply_to=m))
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids):
        due = [i for i in message_ids if i in self.replies and self.replies[i][0] <= time.time()]
        return [self.replies.pop(i)[1] for i in due]


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("certs"), ["127.0.0.1"], 3)


def stand_in_parties(recipe_file, tmp_path, monkeypatch, certs, **sections):
    """The server's recipe (its data.path points nowhere), a stand-in Grid with the two parties
    at nodes 10 and 11 (each holds its simulated client's rows and share of the held-out rows),
    and the run directory with keys party_0 and party_1 bound to clients 0 and 1."""
    from flwr.supercore.task_identity import TaskIdentity

    from fedllm.deploy.launch import eval_file, split_for_parties
    from fedllm.deploy.party import Party
    from fedllm.recipe import load_recipe

    for name in ("_run_id", "_task_id", "_node_id"):  # Flower's identity of the process a Message is made in
        monkeypatch.setattr(TaskIdentity, name, 1)
    federation = {"rounds": 5, "num_clients": 2, "clients_per_round": 2, **sections.pop("federation", {})}
    adapter = sections.pop("adapter", None)  # replaces the tiny recipe's, options and all
    path = recipe_file(federation=federation, client={"max_steps": 1, **sections.pop("client", {})}, **sections)
    if adapter is not None:
        path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "adapter": adapter}))
    recipe = load_recipe(path)
    files = split_for_parties(str(path), [], tmp_path / "data")
    parties = {10 + i: Party(recipe, str(files[i]), i, tmp_path / f"party_{i}", eval_path=str(eval_file(files[i])))
               for i in (0, 1)}
    recipe.data.path = str(tmp_path / "the-server-has-no-such-file.jsonl")
    keys = {10 + i: public_key_pem(certs / f"party_{i}.pub").encode() for i in (0, 1)}
    run_dir = tmp_path / "runs" / "run"
    bind_parties(run_dir, {i: certs / f"party_{i}.pub" for i in (0, 1)}, recipe.federation.num_clients)
    return recipe, StandInGrid(parties, keys), run_dir


def stand_in_federation(recipe_file, tmp_path, monkeypatch, certs, node_keys=(0, 1), **federation):
    """Clients 0 and 1 at nodes 10 and 11, bound to keys party_0 and party_1; once the parties
    reported their sizes, node 10+i holds key node_keys[i]."""
    from fedllm.deploy.flower.server_app import deployed_federation

    recipe, grid, run_dir = stand_in_parties(recipe_file, tmp_path, monkeypatch, certs, federation=federation)
    fed = deployed_federation(recipe, run_dir, grid)
    grid.keys = {10 + i: public_key_pem(certs / f"party_{k}.pub").encode() for i, k in enumerate(node_keys)}
    fed.start()
    return fed


@pytest.mark.slow
def test_a_tampered_upload_is_rejected_and_the_round_goes_on(recipe_file, tmp_path, monkeypatch, certs, caplog):
    fed = stand_in_federation(recipe_file, tmp_path, monkeypatch, certs)
    kinds = ["wrong shape", "extra key", "nan", "100x too large", "not a message"]
    for t, how in enumerate(kinds):
        fed.fleet.transport.grid.how = how
        before = {k: v.clone() for k, v in fed.global_state.items()}
        with caplog.at_level(logging.WARNING, logger="fedllm"):
            result = fed.run_round(t)
        assert [(s.client, s.accepted) for s in result.stats] == [(0, True), (1, False)], how
        assert "client 1 sent" in caplog.text  # logged, named
        assert any(not torch.equal(before[k], result.global_state[k]) for k in before)  # party 0's update went in
        assert all(torch.isfinite(v).all() for v in result.global_state.values())
        fed.global_state, fed.server_state = result.global_state, result.server_state
        caplog.clear()
    assert fed.fleet.state_round(0) == len(kinds) - 1 and fed.fleet.state_round(1) == -1  # a rejected party's state did not advance


@pytest.mark.slow
def test_a_silent_party_is_recorded_missing_and_too_few_answers_stop_the_run_after_the_retries(
        recipe_file, tmp_path, monkeypatch, certs):
    fed = stand_in_federation(recipe_file, tmp_path, monkeypatch, certs, round_timeout_s=0.5, join_timeout_s=1.0,
                              round_retries=2)
    fed.fleet.transport.grid.how = "silent"
    result = fed.run_round(0)  # min_clients=1: party 0's answer is enough, no retry
    assert [(s.client, s.accepted, s.missing) for s in result.stats] == [
        (0, True, None), (1, False, "no answer within federation.round_timeout_s=0.5")]
    fed.recipe.federation.min_clients = 2
    began = time.time()
    with pytest.raises(RecipeError, match="1 of the 2 sampled parties answered .* and 2 retries .* fewer than "
                                          "federation.min_clients=2; the run stopped at its last checkpoint"):
        fed.run_round(1)
    assert time.time() - began >= 3 * 0.5  # the round waited round_timeout_s three times: once and 2 retries
    assert fed.fleet.transport.grid.pushed[11] == 2  # a silent party is not sent the round twice: its message is still out


@pytest.mark.slow
def test_a_round_short_of_min_clients_is_retried_and_takes_a_late_or_failed_party(recipe_file, tmp_path, monkeypatch,
                                                                                  certs, caplog):
    fed = stand_in_federation(recipe_file, tmp_path, monkeypatch, certs, round_timeout_s=1.0, join_timeout_s=1.0,
                              min_clients=2, round_retries=1)
    fed.fleet.transport.grid.how = "late"  # answers 1.5 s after its download: past round_timeout_s, within the retry
    with caplog.at_level(logging.WARNING, logger="fedllm"):
        result = fed.run_round(0)
    assert [(s.client, s.accepted) for s in result.stats] == [(0, True), (1, True)]
    assert "1 of the 2 sampled parties answered, fewer than federation.min_clients=2" in caplog.text
    fed.global_state, fed.server_state = result.global_state, result.server_state
    fed.fleet.transport.grid.how = "fails once"  # its first answer is an error (worker down): the retry sends it the round again
    result = fed.run_round(1)
    assert [(s.client, s.accepted) for s in result.stats] == [(0, True), (1, True)]
    assert fed.fleet.transport.grid.pushed[11] == 3 and fed.fleet.state_round(1) == 1
    fed.global_state, fed.server_state = result.global_state, result.server_state
    fed.recipe.federation.min_clients, fed.recipe.federation.round_timeout_s = 1, 30.0
    fed.fleet.transport.grid.how = "unavailable once"  # Flower could not deliver it: sent again within the round, no retry needed
    began = time.time()
    result = fed.run_round(2)
    assert [(s.client, s.accepted) for s in result.stats] == [(0, True), (1, True)]
    assert fed.fleet.transport.grid.pushed[11] == 5 and time.time() - began < 30


@pytest.mark.slow
def test_a_party_acts_only_as_the_client_id_its_key_is_bound_to(recipe_file, tmp_path, monkeypatch, certs, caplog):
    # node 11 runs client 1's party but authenticated with party_2's key, which is bound to no client
    fed = stand_in_federation(recipe_file, tmp_path, monkeypatch, certs, node_keys=(0, 2), round_timeout_s=0.5,
                              join_timeout_s=1.0)
    with caplog.at_level(logging.WARNING, logger="fedllm"):
        result = fed.run_round(0)
    assert [(s.client, s.accepted, s.missing) for s in result.stats] == [
        (0, True, None), (1, False, "not connected")]
    assert "node 11's key is bound to no client id" in caplog.text
    assert fed.fleet.transport.nodes == {0: 10} and fed.fleet.transport.grid.pushed[11] == 0  # it got no download
    # the keys swapped: each node gets the round of the client its key is bound to, and its party
    # (which is the other client) refuses it: both recorded missing, nothing aggregated
    fed.fleet.transport.grid.keys = {10: fed.fleet.transport.grid.keys[10], 11: public_key_pem(certs / "party_0.pub").encode()}
    fed.fleet.transport.grid.keys[10] = public_key_pem(certs / "party_1.pub").encode()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedllm"), pytest.raises(RecipeError, match="0 of the 2 sampled"):
        fed.run_round(1)
    assert fed.fleet.transport.nodes == {0: 11, 1: 10}
    assert "client 1 dropped out: the server sent client 1's round to client 0" in caplog.text


def local_eval(party, global_state, cfg) -> tuple[float, int, float]:
    """A party's eval by hand, with the simulation's pooled evaluate: (mean loss, tokens, accuracy)."""
    from fedllm.data import collate
    from fedllm.distributed import Reducer
    from fedllm.evaluation import evaluate

    examples = party.eval_examples[: cfg.max_batches * cfg.per_device_eval_batch_size]
    out = evaluate(party.model, party.adapter, global_state, examples, cfg, party.tokenizer.pad_token_id,
                   Reducer(torch.device("cpu")))
    tokens = int((collate(list(examples), party.tokenizer.pad_token_id)["labels"][:, 1:] != -100).sum())
    return out["eval_loss"], tokens, out["token_accuracy"]


@pytest.mark.slow
def test_the_server_holds_no_data_its_client_sizes_are_the_parties_reports_and_a_resume_keeps_them(
        recipe_file, tmp_path, monkeypatch, certs, caplog):
    from pathlib import Path

    from fedllm.deploy.flower.server_app import deployed_federation

    recipe, grid, run_dir = stand_in_parties(recipe_file, tmp_path, monkeypatch, certs,
                                             strategy={"name": "dp_sgd", "max_grad_norm": 1.0},
                                             privacy={"noise_multiplier": 1.0}, federation={"join_timeout_s": 5.0})
    assert not Path(recipe.data.path).exists()
    fed = deployed_federation(recipe, run_dir, grid)
    sizes = [len(grid.parties[10 + i].examples) for i in (0, 1)]
    assert sorted(grid.asked) == [(10, "query.sizes"), (11, "query.sizes")] and fed.data.clients == []
    assert fed.run_info().client_sizes == sizes and sizes[0] != sizes[1]
    assert fed.strategy.rates == [4 / n for n in sizes]  # DP-SGD's per-client sampling rate: batch 4 / its size
    fed.start()
    meta = json.loads((run_dir / "run_meta.json").read_text())
    assert meta["client_sizes"] == sizes and meta["party_eval_examples"] == [len(grid.parties[10 + i].eval_examples)
                                                                             for i in (0, 1)]
    grid.reports[11] = {"num_samples": sizes[1] + 7, "eval_examples": 3}  # party 1's data changed since
    # resumed, and given a held-out file the server owns (fedllm serve --eval-data): party 0's, here
    own = str(tmp_path / "data" / "client_0.eval.jsonl")
    with caplog.at_level(logging.WARNING, logger="fedllm"):
        resumed = deployed_federation(recipe, run_dir, grid, eval_data=own)
    assert resumed.run_info().client_sizes == sizes and resumed.strategy.rates == fed.strategy.rates
    assert f"client 1 now reports {sizes[1] + 7} training examples; the run started with {sizes[1]}" in caplog.text
    assert resumed.fleet.eval_sizes[1] == 3  # what it holds out now is what it will evaluate on
    grid.reports.clear()
    resumed.fleet.eval_sizes[1] = len(grid.parties[11].eval_examples)
    row = resumed.round_eval(1)
    assert row["server_eval_loss"] == pytest.approx(local_eval(grid.parties[10], resumed.global_state, recipe.eval)[0],
                                                    rel=1e-6)
    assert row["eval_loss"] != row["server_eval_loss"]  # the parties' pooled eval: both halves


@pytest.mark.slow
def test_a_size_report_that_is_not_a_count_or_none_at_all_stops_the_run_before_round_0(
        recipe_file, tmp_path, monkeypatch, certs, caplog):
    from fedllm.deploy.flower.server_app import deployed_federation

    recipe, grid, run_dir = stand_in_parties(recipe_file, tmp_path, monkeypatch, certs,
                                             federation={"join_timeout_s": 0.5})
    for bad in (0, 10**12, "many"):
        grid.reports[11] = {"num_samples": bad, "eval_examples": 3}
        with caplog.at_level(logging.WARNING, logger="fedllm"), pytest.raises(
                RecipeError, match=r"client 1 did not report its data size \(its training example count .* is not a "
                                   r"whole number from 1 to 1,000,000,000\): a run needs every party's size"):
            deployed_federation(recipe, run_dir, grid)
        assert f"client 1's size report refused: its training example count {bad!r}" in caplog.text
        caplog.clear()
    grid.reports.clear()
    grid.how = "silent query.sizes"
    with pytest.raises(RecipeError, match=r"client 1 did not report its data size \(no answer within "
                                          r"federation.join_timeout_s=0.5\).* or raise federation.join_timeout_s"):
        deployed_federation(recipe, run_dir, grid)
    assert not (run_dir / "run_meta.json").exists()  # nothing started


@pytest.mark.slow
def test_federated_eval_is_the_token_weighted_mean_of_the_parties_own_evals(recipe_file, tmp_path, monkeypatch, certs,
                                                                            caplog):
    fed = stand_in_federation(recipe_file, tmp_path, monkeypatch, certs, round_timeout_s=0.5)
    result = fed.run_round(0)
    fed.global_state, fed.server_state = result.global_state, result.server_state
    row = fed.round_eval(1)
    by_hand = [local_eval(fed.fleet.transport.grid.parties[10 + i], fed.global_state, fed.recipe.eval) for i in (0, 1)]
    assert all(tokens > 0 for _, tokens, _ in by_hand) and by_hand[0][0] != by_hand[1][0]
    tokens = sum(t for _, t, _ in by_hand)
    assert row["eval_loss"] == pytest.approx(sum(loss * t for loss, t, _ in by_hand) / tokens, rel=1e-5)
    assert row["token_accuracy"] == pytest.approx(sum(acc * t for _, t, acc in by_hand) / tokens, rel=1e-9)
    assert "eval_missing_clients" not in row
    fed.recipe.eval.per_client = True  # the same sums, reported per client as the simulation does
    clients = fed.round_eval(1)["eval_clients"]
    assert [c["tokens"] for c in clients] == [t for _, t, _ in by_hand]
    assert [c["eval_loss"] for c in clients] == pytest.approx([loss for loss, _, _ in by_hand], rel=1e-5)
    fed.recipe.eval.per_client = False
    fed.fleet.transport.grid.how = "silent evaluate"  # party 1 does not answer its eval: left out, logged
    with caplog.at_level(logging.WARNING, logger="fedllm"):
        row = fed.round_eval(1)
    assert row["eval_loss"] == pytest.approx(by_hand[0][0], rel=1e-5) and row["eval_missing_clients"] == [1]
    assert "eval after round 1: client 1 left out: no answer within federation.round_timeout_s=0.5" in caplog.text


@pytest.mark.slow
def test_ferret_deploys_and_trains_what_the_simulation_trains(recipe_file, tmp_path, monkeypatch, certs):
    from fedllm.deploy.flower.server_app import deployed_federation
    from fedllm.engine import Federation
    from fedllm.recipe import load_recipe

    sections = {"adapter": {"name": "ferret", "k": 6}, "client": {"max_steps": 1, "optim": "sgd", "learning_rate": 0.05}}
    recipe, grid, run_dir = stand_in_parties(recipe_file, tmp_path, monkeypatch, certs, **sections)
    fed = deployed_federation(recipe, run_dir, grid)
    fed.start()
    simulated = Federation(load_recipe(tmp_path / "recipe.yaml"), tmp_path / "simulated")
    assert simulated.own_aggregation is not None and fed.own_aggregation is None  # compact there, decoded here
    start = {k: t.clone() for k, t in fed.global_state.items()}
    for t in range(2):
        result = fed.run_round(t)
        assert [(s.client, s.accepted) for s in result.stats] == [(0, True), (1, True)]
        full_bytes = 4 * sum(v.numel() for v in start.values())
        assert all(s.bytes_up < full_bytes / 100 for s in result.stats)  # a party uploads Ferret's coordinates
        fed.global_state, fed.server_state = result.global_state, result.server_state
        simulated.global_state = simulated.run_round(t).global_state
    assert max(float((fed.global_state[k] - start[k]).abs().max()) for k in start) > 1e-4  # it trained
    for k in start:  # as the compact and the generic path agree in simulation
        torch.testing.assert_close(fed.global_state[k], simulated.global_state[k], rtol=1e-5, atol=1e-7)


def spy_weights(fed, monkeypatch) -> dict:
    """Client id -> the weight its last upload was offered to the round's aggregate with."""
    from fedllm.server import Round

    seen, admit = {}, Round.admit

    def spy(round, cid, message, weight, sink=None):
        seen[cid] = weight
        return admit(round, cid, message, weight, sink)

    monkeypatch.setattr(Round, "admit", spy)
    return seen


@pytest.mark.slow
def test_a_party_weighs_what_its_reported_size_gives_whatever_weight_it_claims(recipe_file, tmp_path, monkeypatch,
                                                                              certs):
    fed = stand_in_federation(recipe_file, tmp_path, monkeypatch, certs)
    sizes, weights = fed.run_info().client_sizes, spy_weights(fed, monkeypatch)
    fed.fleet.transport.grid.forged = {"weight": 1e300}  # before: party 1 was the whole mean
    result = fed.run_round(0)
    assert [(s.client, s.accepted) for s in result.stats] == [(0, True), (1, True)]
    assert weights == {0: sizes[0], 1: sizes[1]}  # as the simulation weighs them: their sample counts
    fed.global_state, fed.server_state = result.global_state, result.server_state
    # the largest finite weight on an update of 1e6: before, Σ w·u overflowed to inf and the run "finished"
    fed.fleet.transport.grid.forged, fed.fleet.transport.grid.how = {"weight": 1.7e308}, "all 1e6"
    before = {k: v.clone() for k, v in fed.global_state.items()}
    result = fed.run_round(1)
    assert [(s.client, s.accepted) for s in result.stats] == [(0, True), (1, True)] and weights[1] == sizes[1]
    share = 1e6 * sizes[1] / sum(sizes)  # party 0's own update is about 1e-3: lost in float32 beside this
    for k, v in result.global_state.items():
        assert torch.isfinite(v).all()
        torch.testing.assert_close(v - before[k], torch.full_like(v, share), rtol=1e-5, atol=0.1)


@pytest.mark.slow
def test_a_reply_with_numbers_a_party_cannot_have_is_refused_and_the_run_goes_on(recipe_file, tmp_path, monkeypatch,
                                                                                certs, caplog):
    import math

    from fedllm.metrics import rejection_code

    fed = stand_in_federation(recipe_file, tmp_path, monkeypatch, certs)
    forged = [("steps", math.inf), ("num_samples", math.nan), ("train_loss", math.nan), ("weight", -1.0),
              ("split_bytes_up", 2**62), ("num_samples", fed.run_info().client_sizes[1] + 1)]
    for t, (field, value) in enumerate(forged):
        fed.fleet.transport.grid.forged = {field: value}
        before = {k: v.clone() for k, v in fed.global_state.items()}
        with caplog.at_level(logging.WARNING, logger="fedllm"):
            result = fed.run_round(t)  # before: `steps: Infinity` stopped the server (cannot convert float infinity)
        zeroed = {"num_samples": 0, "train_loss": 0.0, "steps": 0, "split_bytes_up": 0, "accepted": False,
                  "rejected": rejection_code("malformed")}
        assert {k: getattr(result.stats[1], k) for k in zeroed} == zeroed, field
        assert result.stats[0].accepted and result.stats[0].num_samples > 0
        assert f"round {t + 1}: client 1 sent a malformed update (its {field} {value!r} is not" in caplog.text
        assert any(not torch.equal(before[k], result.global_state[k]) for k in before)  # party 0's update went in
        row = fed.metrics.log_round(t + 1, result.stats, {})
        assert row["rejected"] == {"malformed": [1]} and math.isfinite(row["train_loss"])
        fed.global_state, fed.server_state = result.global_state, result.server_state
        caplog.clear()
    assert "NaN" not in (fed.run_dir / "metrics.jsonl").read_text()
    assert fed.fleet.state_round(1) == -1
    fed.fleet.transport.grid.forged = {}
    assert all(s.accepted for s in fed.run_round(len(forged)).stats)


@pytest.mark.slow
def test_a_round_whose_aggregate_overflows_is_refused_and_the_global_state_kept(recipe_file, tmp_path, monkeypatch,
                                                                               certs, caplog):
    from fedllm.deploy.flower.server_app import deployed_federation
    from fedllm.metrics import rejection_code

    recipe, grid, run_dir = stand_in_parties(recipe_file, tmp_path, monkeypatch, certs,
                                             strategy={"name": "fedavg", "server_lr": 10.0})
    fed = deployed_federation(recipe, run_dir, grid)
    fed.start()
    sizes = fed.run_info().client_sizes
    # party 1's upload is finite (3e38 < float32's 3.4e38), and so is the weighted mean; x + 10·mean is not
    assert 10 * 3e38 * sizes[1] / sum(sizes) > 3.5e38
    grid.how = "all 3e38"
    before = {k: v.clone() for k, v in fed.global_state.items()}
    with caplog.at_level(logging.WARNING, logger="fedllm"):
        result = fed.run_round(0)
    refused = rejection_code("non_finite_aggregate")
    assert [(s.client, s.accepted, s.rejected) for s in result.stats] == [(0, False, refused), (1, False, refused)]
    assert all(torch.equal(before[k], result.global_state[k]) for k in before)
    assert "round 1: the aggregate of clients [0, 1] is not finite (NaN/Inf); refused" in caplog.text
    assert fed.fleet.state_round(0) == fed.fleet.state_round(1) == -1  # neither party's state advanced with the refused round
    assert fed.metrics.log_round(1, result.stats, {})["rejected"] == {"non_finite_aggregate": [0, 1]}
    fed.global_state, fed.server_state = result.global_state, result.server_state
    grid.how = "none"  # the run goes on
    result = fed.run_round(1)
    assert all(s.accepted for s in result.stats) and fed.fleet.state_round(0) == fed.fleet.state_round(1) == 1
    assert all(torch.isfinite(v).all() for v in result.global_state.values())

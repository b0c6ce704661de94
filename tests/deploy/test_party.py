"""A party of a deployed federation, without any network: what it refuses to load, where
its state lives, and how it learns that its recipe is not the server's."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from fedllm.deploy.party import Party, recipe_digests
from fedllm.data.loading import BUNDLED_DIR
from fedllm.recipe import recipe_from_dict
from fedllm.registry import RecipeError
from fedllm.strategies.base import RunInfo
from fedllm.wire import MalformedMessage
from tests.conftest import tiny_recipe


@pytest.fixture(scope="module")
def party(tmp_path_factory):
    """One worker for the module: building it (model, data) is the slow part."""
    root = tmp_path_factory.mktemp("party")
    rows = root / "rows.jsonl"
    rows.write_text("".join((BUNDLED_DIR / "quickstart.jsonl").read_text().splitlines(keepends=True)[:12]))
    raw = tiny_recipe(root, client={"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 0.01,
                                     "keep_optimizer_state": True})
    return Party(recipe_from_dict(raw), str(rows), 1, root / "party")


def job(p: Party, round: int, state_round: int) -> dict:
    r = p.recipe
    info = RunInfo(r.federation.rounds, r.federation.num_clients, 2, "uniform", [12] * 4, [2] * 4, 4, r.seed)
    return {"round": round, "lr": 0.01, "state_round": state_round, "run_info": info.__dict__, "digests": p.digests,
            "client_id": 1}


def download(p: Party, change=None) -> bytes:
    tensors = {k: t.clone() for k, t in p.template.items()}
    if change:
        change(tensors)
    return save(tensors)


@pytest.mark.parametrize("change, why", [
    (lambda t: t.update({next(iter(t)): torch.zeros(3, 3)}), "this model's is"),
    (lambda t: t.update({"evil": torch.zeros(2)}), "tensors this model lacks"),
    (lambda t: next(iter(t.values())).view(-1).__setitem__(0, float("nan")), "NaN"),
    (lambda t: t.update({"padding": torch.zeros(100 * sum(v.numel() for v in t.values()))}), "more than"),
])
def test_a_download_that_is_not_this_models_state_is_refused_before_loading(party, change, why):
    before = {k: t.clone() for k, t in party.adapter.state(party.model).items()}
    with pytest.raises(MalformedMessage, match=why):
        party.train(job(party, 0, -1), download(party, change))
    with pytest.raises(MalformedMessage, match="does not parse"):
        party.train(job(party, 0, -1), b"\x07" * 40)
    assert all(torch.equal(before[k], t) for k, t in party.adapter.state(party.model).items())


def test_the_party_keeps_its_state_on_its_own_disk_and_starts_from_what_the_server_accepted(party):
    wire = download(party)
    stats, up = party.train(job(party, 0, -1), wire)
    assert stats["steps"] == 2 and len(up) > 0
    first = party.record(0).optimizer
    assert first and (party.state_dir / "records" / "round_0.safetensors").exists()
    _, up_after_accept = party.train(job(party, 1, 0), wire)  # the server accepted round 0: moments carry over
    _, up_after_reject = party.train(job(party, 2, -1), wire)  # it did not: fresh moments, as in simulation
    assert up_after_accept != up_after_reject
    # a new worker on the same directory (a restarted party) reads the same state back
    again = Party(party.recipe, str(party.state_dir.parent / "rows.jsonl"), 1, party.state_dir)
    assert all(torch.equal(again.record(1).optimizer[k], party.record(1).optimizer[k]) for k in first)
    assert json.loads((party.state_dir / "party.json").read_text())["base_model_loads"] == 2


def test_a_party_whose_recipe_differs_from_the_servers_is_told_which_section(party):
    theirs = dict(party.digests, adapter="0" * 16)
    with pytest.raises(RecipeError, match="differs from the server's in adapter"):
        party.train({**job(party, 0, -1), "digests": theirs}, download(party))
    with pytest.raises(RecipeError, match="client 3's round to client 1"):
        party.train({**job(party, 0, -1), "client_id": 3}, download(party))
    changed = party.recipe.model_copy(deep=True)
    changed.data.path = "elsewhere.jsonl"  # the data path is the party's own business
    assert recipe_digests(changed) == party.digests


# ---- the relay and the supervised worker: a worker that dies alone ------------------------
def test_the_relay_fails_at_once_when_the_worker_is_gone_and_in_time_when_it_hangs(tmp_path):
    import socket as sockets
    import time

    from fedllm.deploy.relay import WorkerDown, ask_worker, worker_key

    worker_key(tmp_path)
    key = str(tmp_path / "worker.key")
    began = time.time()
    with pytest.raises(WorkerDown, match="not running .*FileNotFoundError"):  # never started: no socket
        ask_worker(str(tmp_path / "none.sock"), key, {"kind": "identify"}, timeout_s=30)
    dead = sockets.socket(sockets.AF_UNIX)
    dead.bind(str(tmp_path / "dead.sock"))
    dead.close()  # killed: its socket file is left behind, nobody listens
    with pytest.raises(WorkerDown, match="not running .*ConnectionRefusedError"):
        ask_worker(str(tmp_path / "dead.sock"), key, {"kind": "identify"}, timeout_s=30)
    assert time.time() - began < 5  # neither waited for the timeout
    with sockets.socket(sockets.AF_UNIX) as stuck:  # listening, never answering (a frozen worker)
        stuck.bind(str(tmp_path / "stuck.sock"))
        stuck.listen()
        began = time.time()
        with pytest.raises(WorkerDown, match="did not answer within 1 s"):
            ask_worker(str(tmp_path / "stuck.sock"), key, {"kind": "identify"}, timeout_s=1)
        assert 1 <= time.time() - began < 5


@pytest.mark.slow
def test_a_worker_killed_alone_is_started_again_and_answers(tmp_path):
    import os
    import signal
    import time

    import yaml

    from fedllm.deploy.launch import Worker
    from fedllm.deploy.relay import SOCKET, ask_worker

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join((BUNDLED_DIR / "quickstart.jsonl").read_text().splitlines(keepends=True)[:8]))
    state = tmp_path / "party"
    state.mkdir()
    (state / "recipe.yaml").write_text(yaml.safe_dump(tiny_recipe(tmp_path)))
    worker = Worker(state, str(rows), 1)
    worker.CHECK_EVERY_S = 0.2
    ask = lambda: ask_worker(str(state / SOCKET), str(state / "worker.key"), {"kind": "identify"}, timeout_s=10)[0]  # noqa: E731
    try:
        worker.start()
        assert ask()["client_id"] == 1
        first = worker.process.pid
        os.kill(first, signal.SIGKILL)  # the OOM killer takes the worker, nothing else
        deadline = time.time() + 120
        while (worker.process.pid == first or worker.process.poll() is not None) and time.time() < deadline:
            time.sleep(0.2)
        answer = None
        while answer is None and time.time() < deadline:
            try:
                answer = ask()
            except Exception:
                time.sleep(0.2)
        assert answer and answer["client_id"] == 1 and worker.process.pid != first
        assert json.loads((state / "party.json").read_text())["base_model_loads"] == 2  # honest: a second load
    finally:
        worker.stop()
    assert worker.process.poll() is not None  # stopped by its process id



def test_serve_binds_each_party_key_to_one_client_id_and_says_the_form_when_it_is_wrong(tmp_path):
    from fedllm.deploy.launch import bind_parties, parse_party_keys

    assert parse_party_keys(["certs/party_0.pub=0", "certs/p=1.pub=1"]) == {0: Path("certs/party_0.pub"),
                                                                           1: Path("certs/p=1.pub")}
    for flags, why in [(["certs/party_0.pub"], "KEY.pub=CLIENT_ID"), (["k.pub=zero"], "KEY.pub=CLIENT_ID"),
                       (["a.pub=0", "b.pub=0"], "client 0 is bound to two keys"),
                       (["a.pub=0", "a.pub=1"], "bound to two client ids")]:
        with pytest.raises(RecipeError, match=why):
            parse_party_keys(flags)
    with pytest.raises(RecipeError, match="binds client 2, but this federation has clients 0..1"):
        bind_parties(tmp_path, {2: tmp_path / "k.pub"}, num_clients=2)


def test_a_bound_key_is_read_as_the_superlink_stores_it_and_a_bad_one_is_named(tmp_path):
    pytest.importorskip("cryptography", reason="keys are read with the Flower extra's cryptography")
    from fedllm.deploy.certs import make_certificates
    from fedllm.deploy.launch import PARTIES, bind_parties

    certs = make_certificates(tmp_path / "certs", ["127.0.0.1"], 1)
    bind_parties(tmp_path / "run", {0: certs / "party_0.pub"}, num_clients=2)
    assert json.loads((tmp_path / "run" / PARTIES).read_text())["0"].startswith("-----BEGIN PUBLIC KEY-----")
    (tmp_path / "k.pub").write_text("not a key")
    with pytest.raises(RecipeError, match="k.pub: not a readable OpenSSH public key"):
        bind_parties(tmp_path / "run", {0: tmp_path / "k.pub"}, num_clients=2)


def test_a_supernode_alive_but_cut_off_is_started_again(tmp_path):
    """As seen after a server restart: the SuperLink answers its heartbeat with 401, it says it
    is leaving, and then hangs instead of exiting. A SuperNode that keeps running is left alone."""
    import sys
    import time

    from fedllm.deploy.launch import SuperNode

    def supernode(says: str) -> SuperNode:
        starts = tmp_path / f"starts_{len(says)}"
        code = (f"import sys, time; open({str(starts)!r}, 'a').write('x'); print({says!r}, flush=True); "
                "time.sleep(300)")
        node = SuperNode([sys.executable, "-c", code], {}, tmp_path / f"supernode_{len(says)}.log")
        node.RESTART_AFTER_S, node.STUCK_AFTER_S = 0.2, 1.0
        return node

    cut_off = supernode("ERROR: Client error '401 Unauthorized' ... SuperNode terminated gracefully.")
    healthy = supernode("INFO: Receiving: train message")
    try:
        cut_off.start()
        healthy.start()
        deadline = time.time() + 20
        while len((tmp_path / "starts_75").read_text() if (tmp_path / "starts_75").exists() else "") < 2:
            assert time.time() < deadline, "the cut-off SuperNode was not started again"
            time.sleep(0.2)
        assert (tmp_path / f"starts_{len('INFO: Receiving: train message')}").read_text() == "x"
    finally:
        cut_off.stop()
        healthy.stop()
    assert cut_off.process.poll() is not None and healthy.process.poll() is not None

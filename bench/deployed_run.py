"""One fixed deployed run for bench/identical_runs.py, without Flower's network: the ServerApp's
own entry point, `server_app.main(grid, context)`, on a run directory prepared as `fedllm serve`
prepares it, with a stand-in Grid that hands each message to fedllm's ClientApp (the relay
Flower starts per message), which asks the party's worker process (`python -m
fedllm.deploy.party`, started as `fedllm join` starts it). recipes/quickstart.yaml, 3 rounds,
3 parties of which 2 are sampled a round.

    python bench/deployed_run.py OUT    # OUT is the run directory: final/, metrics.jsonl, ledger.jsonl
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedllm.deploy.certs import make_certificates
from fedllm.deploy.flower import client_app, server_app
from fedllm.deploy.launch import Worker, bind_parties, eval_file, prepare_run, public_key_pem, split_for_parties
from fedllm.deploy.relay import SOCKET, worker_key

ROOT = Path(__file__).resolve().parent.parent
RECIPE = str(ROOT / "recipes" / "quickstart.yaml")
PARTIES = 3
OVERRIDES = ["federation.rounds=3", f"federation.num_clients={PARTIES}", "federation.clients_per_round=2",
             "output.progress=false"]
FIRST_NODE = 10  # party i is Flower node FIRST_NODE + i


class NodeInfo:  # what Grid.get_nodes() tells the ServerApp about a node (the fields it reads)
    def __init__(self, node_id: int, public_key: bytes):
        self.node_id, self.public_key = node_id, public_key


class StandInGrid:
    """Flower's Grid as the ServerApp uses it. A pushed message goes at once through the
    ClientApp of its node, with that node's config (its worker's socket and key), as the
    party's SuperNode would run it; the reply waits to be pulled."""

    def __init__(self, nodes: dict[int, tuple[bytes, Context]]):
        self.nodes = nodes  # node id -> (its public key, the ClientApp's context on it)
        self.replies: dict[str, Message] = {}
        self.pushed = 0

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def get_nodes(self) -> list[NodeInfo]:
        return [NodeInfo(node, key) for node, (key, _) in self.nodes.items()]

    def push_messages(self, messages) -> list[str]:
        for message in messages:
            # Flower's grids set the id this way when a message is pushed (a counter keeps runs alike)
            message.metadata.__dict__["_message_id"] = str(self.pushed)
            self.pushed += 1
            _, context = self.nodes[message.metadata.dst_node_id]
            self.replies[message.metadata.message_id] = client_app.app(message, context)
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids) -> list[Message]:
        return [self.replies.pop(i) for i in message_ids if i in self.replies]


def start_parties(run_dir: Path, work: Path) -> tuple[list[Worker], dict]:
    """Each party's rows, key and worker: party i acts as client i; node id -> (key, context)."""
    certs = make_certificates(work / "certs", ["127.0.0.1"], PARTIES)
    bind_parties(run_dir, {i: certs / f"party_{i}.pub" for i in range(PARTIES)}, PARTIES)
    files = split_for_parties(RECIPE, OVERRIDES, work / "data")
    workers, nodes = [], {}
    for i, rows in enumerate(files):
        state = work / f"party_{i}"
        state.mkdir(mode=0o700)
        shutil.copy(run_dir / "recipe.yaml", state / "recipe.yaml")  # a party joins with the server's recipe
        worker_key(state)
        workers.append(Worker(state, str(rows), i, str(eval_file(rows))))
        config = {"worker-socket": str(state / SOCKET), "worker-key": str(state / "worker.key")}
        key = public_key_pem(certs / f"party_{i}.pub").encode()
        nodes[FIRST_NODE + i] = (key, Context(run_id=1, node_id=FIRST_NODE + i, node_config=config, state=RecordDict(),
                                              run_config={}))
    for worker in workers:
        worker.start()
    return workers, nodes


def main(out: Path) -> None:
    # Flower's identity of the process a Message is made in, as its ServerApp process sets it
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    run_dir = prepare_run(RECIPE, [*OVERRIDES, f"output.dir={out.parent}", f"output.name={out.name}"])
    with tempfile.TemporaryDirectory(prefix="fedllm-deployed-") as work:  # short: the worker sockets' paths
        workers, nodes = start_parties(run_dir, Path(work))
        try:
            context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(),
                              run_config={"run-dir": str(run_dir)})
            server_app.main(StandInGrid(nodes), context)
        finally:
            for worker in workers:
                worker.stop()


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())

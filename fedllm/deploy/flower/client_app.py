"""The ClientApp: a thin relay. SuperNode starts it afresh for every message, so it loads
no model; it passes the server's message to the party's long-lived worker (fedllm.deploy.
party, started by `fedllm join`, which holds the resident base model and the party's
state) and the worker's answer back. The socket and key come from the party's node config."""
from __future__ import annotations

import json

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedllm.deploy.flower.records import read_bytes, wire_record
from fedllm.deploy.relay import ask_worker

app = ClientApp()


def worker(context: Context, header: dict, payload: bytes = b"") -> tuple[dict, bytes]:
    config = context.node_config
    if "worker-socket" not in config:
        raise RuntimeError("this SuperNode has no fedllm party worker: start the party with `fedllm join`")
    # the worker has the round's time to answer: past it the server has counted this party missing
    timeout_s = float(header.get("timeout_s", 600.0))
    answer, out = ask_worker(str(config["worker-socket"]), str(config["worker-key"]), header, payload, timeout_s)
    if not answer.get("ok"):
        raise RuntimeError(answer.get("error", "the party's worker refused the message"))  # Flower replies with an error
    return answer, out


@app.train()
def train(msg: Message, context: Context) -> Message:
    job = json.loads(str(msg.content["job"]["job"]))
    answer, upload = worker(context, {"kind": "train", **job}, read_bytes(msg.content["down"]))
    stats = {k: v for k, v in answer.items() if k != "ok"}
    return Message(RecordDict({"up": wire_record(upload), "stats": ConfigRecord({"stats": json.dumps(stats)})}),
                   reply_to=msg)

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


def reply(msg: Message, answer: dict, upload: bytes | None = None) -> Message:
    content = RecordDict({"stats": ConfigRecord({"stats": json.dumps({k: v for k, v in answer.items() if k != "ok"})})})
    if upload is not None:
        content["up"] = wire_record(upload)
    return Message(content, reply_to=msg)


def job_of(msg: Message) -> dict:
    return json.loads(str(msg.content["job"]["job"]))


@app.train()
def train(msg: Message, context: Context) -> Message:
    answer, upload = worker(context, {"kind": "train", **job_of(msg)}, read_bytes(msg.content["down"]))
    return reply(msg, answer, upload)


@app.query("sizes")
def sizes(msg: Message, context: Context) -> Message:
    """Before round 0: how many training and held-out examples this party has."""
    answer, _ = worker(context, {"kind": "sizes", **job_of(msg)})
    return reply(msg, answer)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The global adapter on the party's own held-out examples: summed loss, tokens, correct predictions."""
    answer, _ = worker(context, {"kind": "evaluate", **job_of(msg)}, read_bytes(msg.content["down"]))
    return reply(msg, answer)

"""A deployment's transport on Flower: messages to the parties' SuperNodes through the
ServerApp's Grid, and who is who by the key each node authenticated with. The parties and
what is asked of them are transport-neutral (fedllm.deploy.fleet.PartiesFleet)."""
from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedllm.deploy.fleet import Job, PartiesFleet
from fedllm.deploy.flower.records import read_bytes, wire_record

log = logging.getLogger("fedllm")
POLL_S = 0.2  # how often the server asks the SuperLink for replies (a local call)


def flower_fleet(recipe, run_dir: Path, grid: Grid, party_keys: dict[int, bytes], eval_data: str | None = None) -> PartiesFleet:
    """The parties behind Flower's `grid`; `party_keys`: client id -> the public key that may act
    as it (`fedllm serve --party-key KEY.pub=CLIENT_ID`)."""
    return PartiesFleet(recipe, run_dir, GridTransport(grid, party_keys, recipe.federation), eval_data)


class GridTransport:
    def __init__(self, grid: Grid, party_keys: dict[int, bytes], federation):
        self.grid, self.party_keys, self.federation = grid, party_keys, federation
        self.nodes: dict[int, int] = {}  # client id -> Flower node id
        self.unbound: set[int] = set()  # nodes whose key no client id is bound to (warned once)

    def connected(self) -> set[int]:
        self.refresh_nodes()
        return set(self.nodes)

    def ask(self, kind: str, wanted: list[int], job: Job, payload: bytes, deadline: float, group: str) -> dict:
        """Sends message `kind` (job(cid) as JSON, plus `payload`) to each wanted party once it is
        connected, until all answered or `deadline`: client id -> its answer (a dict) or why none.
        A message Flower could not deliver is sent again once the party's node is back."""
        pending, replies = {}, {}
        self.refresh_nodes()
        while True:
            new = [cid for cid in wanted if cid in self.nodes and cid not in replies and cid not in pending.values()]
            messages = [self.message(kind, cid, job(cid), payload, group) for cid in new]
            if messages and list(self.grid.push_messages(messages)):
                pending.update({m.metadata.message_id: cid for m, cid in zip(messages, new)})
            for reply in self.grid.pull_messages(sorted(pending)) if pending else []:
                if (cid := pending.pop(reply.metadata.reply_to_message_id, None)) is None:
                    continue
                if reply.has_error() and reply.error.code == ErrorCode.NODE_UNAVAILABLE:
                    self.nodes.pop(cid, None)
                    continue
                replies[cid] = self.stats(reply)
            if len(replies) == len(wanted) or time.time() >= deadline:
                return replies
            time.sleep(POLL_S)
            if any(cid not in self.nodes for cid in wanted):
                self.refresh_nodes()

    def message(self, kind: str, cid: int, job: dict, payload: bytes, group: str) -> Message:
        content = RecordDict({"job": ConfigRecord({"job": json.dumps(job)})})
        if payload:
            content["down"] = wire_record(payload)
        return Message(content, dst_node_id=self.nodes[cid], message_type=kind, group_id=group)

    @staticmethod
    def stats(reply: Message) -> dict | str:
        """A party's JSON numbers from its reply, or why there are none."""
        if reply.has_error():
            return error_reason(reply)
        try:
            stats = json.loads(reply.content["stats"]["stats"])
        except (KeyError, TypeError, ValueError) as err:
            return f"its reply is not JSON numbers ({type(err).__name__}: {err})"
        return stats if isinstance(stats, dict) else f"its reply is {type(stats).__name__}, not JSON numbers"

    # ---- who is who --------------------------------------------------------------------
    def refresh_nodes(self) -> None:
        """Maps the connected parties to client ids by the key each authenticated with: the
        SuperLink admits only registered keys and tells the ServerApp each node's key; a key
        acts as the one client id `fedllm serve --party-key KEY.pub=CLIENT_ID` bound it to."""
        by_key = {key: cid for cid, key in self.party_keys.items()}
        nodes = {}
        for info in self.grid.get_nodes():  # the nodes online now
            cid = by_key.get(normal_key(info.public_key))
            if cid is not None:
                nodes[cid] = info.node_id
            elif info.node_id not in self.unbound:
                self.unbound.add(info.node_id)
                log.warning("node %d's key is bound to no client id (fedllm serve --party-key KEY.pub=CLIENT_ID): "
                            "it gets no round", info.node_id)
        for cid in sorted(nodes.keys() - self.nodes.keys()):
            log.info("client %d is node %d", cid, nodes[cid])
        self.nodes = nodes

    def exchange(self, t: int, sampled: list[int], job: Job, wire: bytes) -> tuple[dict, set]:
        """Round t's download to each sampled party as soon as it is connected (one that reconnects
        mid-round still gets it) and its answer back, within round_timeout_s; while fewer than
        min_clients have answered, the round waits round_timeout_s again (up to round_retries
        times), sending again to those whose party failed. Client id -> (stats, upload bytes) or
        why none came; and the clients the download went to."""
        f = self.federation
        deadline, retries = time.time() + f.round_timeout_s, f.round_retries
        pending, replies, sent = {}, {}, set()  # sent message id -> client id; client id -> its reply
        self.refresh_nodes()
        while True:
            new = [cid for cid in sampled if cid in self.nodes and cid not in replies and cid not in pending.values()]
            messages = [self.message("train", cid, job(cid), wire, str(t)) for cid in new]
            if messages and list(self.grid.push_messages(messages)):
                pending.update({m.metadata.message_id: cid for m, cid in zip(messages, new)})
                sent.update(new)
            for reply in self.grid.pull_messages(sorted(pending)) if pending else []:
                if (cid := pending.pop(reply.metadata.reply_to_message_id, None)) is None:
                    continue
                if reply.has_error() and reply.error.code == ErrorCode.NODE_UNAVAILABLE:
                    # Flower could not deliver it (the node missed its heartbeats, e.g. a party that
                    # crashed and is restarting): sent again once the node is back, within the round
                    log.info("round %d: client %d's node is unavailable; it gets the round when it is back", t, cid)
                    self.nodes.pop(cid, None)
                    continue
                replies[cid] = reply
            if len(replies) == len(sampled) or time.time() >= deadline:
                answered = sum(not r.has_error() for r in replies.values())
                if answered >= f.min_clients or retries == 0:
                    break
                if time.time() < deadline:  # everyone replied, too many with failures: the retry starts at the deadline
                    time.sleep(POLL_S)
                    continue
                retries -= 1
                failed = sorted(cid for cid, r in replies.items() if r.has_error())
                log.warning("round %d: %d of the %d sampled parties answered, fewer than federation.min_clients=%d: "
                            "waiting federation.round_timeout_s=%g again (%d retries left)", t, answered, len(sampled),
                            f.min_clients, f.round_timeout_s, retries)
                for cid in failed:  # their party failed this message: it gets the round again
                    del replies[cid]
                deadline = time.time() + f.round_timeout_s
            time.sleep(POLL_S)
            if any(cid not in self.nodes for cid in sampled):
                self.refresh_nodes()
        return {cid: self.answer(replies[cid]) if cid in replies else
                (f"no answer within federation.round_timeout_s={f.round_timeout_s:g}" if cid in sent else "not connected")
                for cid in sampled}, sent

    @staticmethod
    def answer(reply: Message) -> tuple[dict, bytes] | str:
        if reply.has_error():  # its ClientApp failed, or Flower could not deliver
            return error_reason(reply)
        try:
            stats = json.loads(reply.content["stats"]["stats"])
            return stats if isinstance(stats, dict) else {}, read_bytes(reply.content["up"])
        except (KeyError, TypeError, ValueError) as err:
            return {"malformed": f"its reply is not an upload ({type(err).__name__}: {err})"}, b""


def error_reason(reply: Message) -> str:
    """A failed reply's reason as the party said it: Flower wraps a ClientApp's exception as
    "<class 'module.Error'>:<'text'>"; the class is Flower's plumbing, the text is the party's."""
    reason = str(reply.error.reason)
    wrapped = re.fullmatch(r"<class '(?:[\w.]+\.)?(\w+)'>:<'(.*)'>", reason, flags=re.DOTALL)
    if wrapped is None:
        return reason
    kind, text = wrapped.groups()
    return text if kind in ("RuntimeError", "AppNotSigned", "WorkerDown") else f"{kind}: {text}"


def normal_key(pem) -> bytes | None:
    """A public key as DER bytes (None if there is none), so two encodings of one key compare equal."""
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_public_key(bytes(pem))
    except (TypeError, ValueError):
        return None
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)



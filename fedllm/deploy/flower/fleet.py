"""Where a deployed federation's clients run: the parties behind Flower's Grid (after Flower's
Strategy/Grid split: fedllm's `Server` decides, this fleet carries out). Each round sends the
server's download bytes to the sampled parties and hands each upload to the round's `admit`,
validated exactly as the simulation validates its own, with every number of a reply checked
against what the server knows (reports.check_train_report: a party's weight is recomputed as
the simulation gives it, never above its reported size); a party that does not answer within
`federation.round_timeout_s` is recorded missing and the round goes on without it. The server
holds no party's data: before round 0 each party reports its counts (the run's client sizes),
and evaluation is federated (each party scores the global adapter on its own held-out rows;
the server pools the sums)."""
from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedllm.data import PreparedData
from fedllm.data.prepare import prepare_local_data
from fedllm.deploy.flower.records import read_bytes, wire_record
from fedllm.deploy.party import recipe_digests
from fedllm.deploy.reports import TrainLimits, check_eval, check_sizes, check_train_report, pooled_eval
from fedllm.metrics import rejection_code
from fedllm.registry import RecipeError
from fedllm.server import ClientRow, Round, Server
from fedllm.wire import MalformedMessage, deserialize

log = logging.getLogger("fedllm")
STATE_ROUND = "state_round"  # the server's record of a party: the last round whose upload it accepted
POLL_S = 0.2  # how often the server asks the SuperLink for replies (a local call)
# An adapter's own loop takes steps its options set beyond client.max_steps (SFPrompt's local-loss
# and split steps): a reported step count may exceed the recipe's by this much
OWN_LOOP_STEPS = 10_000
PROMPT_TOKENS = 2**10  # room for the virtual tokens an adapter prepends to a split step's hidden states


class FlowerFleet:
    """The parties of a Flower deployment. `party_keys`: client id -> the public key that may act
    as it (`fedllm serve --party-key KEY.pub=CLIENT_ID`); `eval_data`: a held-out file the server
    owns (fedllm serve --eval-data), or None."""

    trains_here = False

    def __init__(self, recipe, run_dir: Path, grid: Grid, party_keys: dict[int, bytes], eval_data: str | None = None):
        self.recipe, self.run_dir, self.grid, self.party_keys, self.eval_data = recipe, Path(run_dir), grid, party_keys, eval_data
        self.nodes: dict[int, int] = {}  # client id -> Flower node id
        self.unbound: set[int] = set()  # nodes whose key no client id is bound to (warned once)
        self.digests = recipe_digests(recipe)
        self.eval_sizes: list[int] = []  # each party's held-out examples, as it reported them

    def bind(self, server: Server, participation, store, client, run_info, model: torch.nn.Module) -> None:
        self.server, self.participation, self.store, self.run_info = server, participation, store, run_info
        # an upload is at most its decoded elements in float64 plus a header; past that it is refused unread
        self.max_upload_bytes = 8 * server.max_elements + 2**20
        self.split_step_bytes = split_step_bytes(model, run_info.batch_size, self.recipe.data.max_length)

    # ---- what the server knows of the parties' data ------------------------------------
    def load_data(self, recipe, tokenizer, run_dir, device) -> PreparedData:
        """No party's examples: the counts each party reports before round 0 (on resume, the ones
        the run recorded), and the server's own held-out set if it was given one."""
        sizes, self.eval_sizes = self.party_sizes()
        held_out = prepare_local_data(recipe.data, tokenizer, self.eval_data) if self.eval_data else []
        return PreparedData(clients=[], eval=held_out, client_sizes=sizes, num_dropped=0)

    def party_sizes(self) -> tuple[list[int], list[int]]:
        """Every party's (training, held-out) example counts, asked within join_timeout_s. A new run
        needs every party's: one that does not answer, or reports what cannot be a count, stops it
        before round 0. A resumed run keeps the counts it recorded (a change is reported)."""
        f = self.recipe.federation
        wanted = list(range(f.num_clients))
        job = lambda cid: {"digests": self.digests, "client_id": cid, "timeout_s": f.join_timeout_s}  # noqa: E731
        # the run's one wait for every party to connect: a party that comes later is taken in when sampled
        replies = self.ask("query.sizes", wanted, job, b"", time.time() + f.join_timeout_s, "sizes")
        reports, problems = {}, {}
        for cid in wanted:
            got = replies.get(cid, f"no answer within federation.join_timeout_s={f.join_timeout_s:g}")
            got = check_sizes(got) if isinstance(got, dict) else got
            (problems if isinstance(got, str) else reports)[cid] = got
        for cid, why in problems.items():
            log.warning("client %d's size report refused: %s", cid, why)
        recorded = self.recorded_sizes()
        if recorded is not None:
            for cid, (n, _) in reports.items():
                if n != recorded[0][cid]:
                    more = " (while it trains on more, its uploads are refused)" if n > recorded[0][cid] else ""
                    log.warning("client %d now reports %d training examples; the run started with %d and keeps that "
                                "number (its DP accounting, local steps and the most its upload weighs)%s: start a new "
                                "run to use the new count", cid, n, recorded[0][cid], more)
            return recorded[0], [reports[c][1] if c in reports else recorded[1][c] for c in wanted]
        if problems:
            (cid, why), more = next(iter(problems.items())), " (and others: see server.log)" if len(problems) > 1 else ""
            raise RecipeError(f"client {cid} did not report its data size ({why}){more}: a run needs every party's size "
                              "before round 0; start every party (`fedllm join`) with the server's recipe, or raise "
                              "federation.join_timeout_s")
        log.info("the parties' sizes: %s training examples, %s held out", [reports[c][0] for c in wanted],
                 [reports[c][1] for c in wanted])
        return [reports[c][0] for c in wanted], [reports[c][1] for c in wanted]

    def recorded_sizes(self) -> tuple[list[int], list[int]] | None:
        """The sizes a run started with (run_meta.json), if it started."""
        path = self.run_dir / "run_meta.json"
        meta = json.loads(path.read_text()) if path.exists() else {}
        n = self.recipe.federation.num_clients
        sizes, evals = meta.get("client_sizes"), meta.get("party_eval_examples", [0] * n)
        return (sizes, evals) if isinstance(sizes, list) and len(sizes) == n and len(evals) == n else None

    def run_meta(self) -> dict:
        return {"party_eval_examples": self.eval_sizes, "sizes_reported_by_parties": True}

    # ---- federated evaluation ----------------------------------------------------------
    def evaluate(self, rounds_done: int, here: Callable[[], dict]) -> dict:
        """The parties' evals of the global adapter, pooled token-weighted under the simulation's
        names; with a server-owned held-out set also its eval, as server_eval_loss etc."""
        return {**self.federated_eval(rounds_done), **{f"server_{k}": v for k, v in here().items()}}

    def federated_eval(self, rounds_done: int) -> dict:
        r = self.recipe
        holders = [cid for cid, n in enumerate(self.eval_sizes) if n > 0]
        if not holders:
            return {}
        self.refresh_nodes()
        asked = [cid for cid in holders if cid in self.nodes]
        job = lambda cid: {"digests": self.digests, "client_id": cid, "batch_size": r.eval.per_device_eval_batch_size,  # noqa: E731
                           "max_batches": r.eval.max_batches, "timeout_s": r.federation.round_timeout_s}
        wire = self.server.channel.down_wire(self.server.global_state, {})
        replies = self.ask("evaluate", asked, job, wire, time.time() + r.federation.round_timeout_s, f"eval-{rounds_done}")
        sums, left_out = torch.zeros(r.federation.num_clients, 3, dtype=torch.float64), {}
        for cid in holders:
            got = replies.get(cid, "not connected" if cid not in asked else
                              f"no answer within federation.round_timeout_s={r.federation.round_timeout_s:g}")
            got = check_eval(got, self.eval_sizes[cid] * r.data.max_length) if isinstance(got, dict) else got
            if isinstance(got, str):
                left_out[cid] = got
                log.warning("eval after round %d: client %d left out: %s", rounds_done, cid, got)
            else:
                sums[cid] = torch.tensor(got, dtype=torch.float64)
        row = pooled_eval(sums, r.eval.per_client) if len(left_out) < len(holders) else {}
        return {**row, **({"eval_missing_clients": sorted(left_out)} if left_out else {})}

    # ---- one exchange with the parties -------------------------------------------------
    def ask(self, kind: str, wanted: list[int], job, payload: bytes, deadline: float, group: str) -> dict:
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

    def state_round(self, client_id: int) -> int:
        record = self.store.get(client_id)
        return int(record[STATE_ROUND]) if record else -1

    # ---- one round ---------------------------------------------------------------------
    def run_round(self, t: int, round: Round, lr: float, progress=None) -> list[ClientRow]:
        r = self.recipe
        sampled = self.participation.sampled(t)
        wire = self.server.down_wire()
        answers, sent = self.exchange(t, sampled, lr, wire)
        rows = []
        for cid in sampled:  # in sampled order, as the simulation sums them
            answer = answers[cid]
            if isinstance(answer, str):
                log.warning("round %d: client %d dropped out: %s", t + 1, cid, answer)
                rows.append(ClientRow(cid, bytes_down=len(wire) if cid in sent else 0, missing=answer))
                continue
            info, up = answer
            numbers = info["malformed"] if "malformed" in info else check_train_report(info, self.train_limits(cid))
            message, size = self.receive(t, cid, up, numbers)
            rejection = round.admit(cid, message, numbers["weight"] if isinstance(numbers, dict) else 0.0)
            rows.append(answer_row(cid, numbers, size, len(wire), rejection))
        answered = sum(row.missing is None for row in rows)
        if answered < r.federation.min_clients:
            raise RecipeError(
                f"round {t}: {answered} of the {len(sampled)} sampled parties answered within "
                f"federation.round_timeout_s={r.federation.round_timeout_s:g} and {r.federation.round_retries} "
                f"retries (federation.round_retries), fewer than federation.min_clients={r.federation.min_clients}; "
                f"the run stopped at its last checkpoint: when the parties are back, continue it with "
                f"`fedllm serve --resume {self.run_dir}`")
        return rows

    def settle(self, t: int, rows: list[ClientRow]) -> None:
        """A party's state advances only with a round that applied its upload."""
        for row in rows:
            if row.accepted:
                self.store.put(row.client, {STATE_ROUND: torch.tensor(t)})

    def train_limits(self, client_id: int) -> TrainLimits:
        """What the client's train reply may say, from what the server knows: the size it reported
        before round 0, and the local steps the recipe gives it (RunInfo.local_steps) in this round
        and, for a strategy that has a client catch up on missed rounds (noise-robust ADMM), in
        every round before."""
        run = self.run_info
        steps = (run.rounds + 1) * run.local_steps[client_id] + OWN_LOOP_STEPS
        return TrainLimits(run.client_sizes[client_id], steps, self.split_step_bytes, self.server.strategy.uniform_weights)

    def exchange(self, t: int, sampled: list[int], lr: float, wire: bytes) -> tuple[dict, set]:
        """Round t's download to each sampled party as soon as it is connected (one that reconnects
        mid-round still gets it) and its answer back, within round_timeout_s; while fewer than
        min_clients have answered, the round waits round_timeout_s again (up to round_retries
        times), sending again to those whose party failed. Client id -> (stats, upload bytes) or
        why none came; and the clients the download went to."""
        f = self.recipe.federation
        deadline, run_info, retries = time.time() + f.round_timeout_s, asdict(self.run_info), f.round_retries
        pending, replies, sent = {}, {}, set()  # sent message id -> client id; client id -> its reply
        self.refresh_nodes()
        while True:
            new = [cid for cid in sampled if cid in self.nodes and cid not in replies and cid not in pending.values()]
            messages = [self.train_message(t, cid, lr, wire, run_info) for cid in new]
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

    def train_message(self, t: int, cid: int, lr: float, wire: bytes, run_info: dict) -> Message:
        job = {"round": t, "lr": lr, "state_round": self.state_round(cid), "run_info": run_info,
               "digests": self.digests, "client_id": cid, "timeout_s": self.recipe.federation.round_timeout_s}
        content = RecordDict({"down": wire_record(wire), "job": ConfigRecord({"job": json.dumps(job)})})
        return Message(content, dst_node_id=self.nodes[cid], message_type="train", group_id=str(t))

    @staticmethod
    def answer(reply: Message) -> tuple[dict, bytes] | str:
        if reply.has_error():  # its ClientApp failed, or Flower could not deliver
            return error_reason(reply)
        try:
            stats = json.loads(reply.content["stats"]["stats"])
            return stats if isinstance(stats, dict) else {}, read_bytes(reply.content["up"])
        except (KeyError, TypeError, ValueError) as err:
            return {"malformed": f"its reply is not an upload ({type(err).__name__}: {err})"}, b""

    def receive(self, t: int, client_id: int, wire: bytes, numbers: dict | str):
        """The server's half of the Channel on an untrusted upload: what it decodes to, or why not,
        and its size. `numbers`: the reply's checked numbers, or why they were refused."""
        size = len(wire)
        if isinstance(numbers, str):
            return MalformedMessage(numbers), size
        if size > self.max_upload_bytes:
            return MalformedMessage(f"it has {size} bytes, more than the {self.max_upload_bytes} this model's update can take"), size
        try:
            return self.server.channel.decode(deserialize(wire), self.server.wire_context(t, client_id)), size
        except Exception as err:  # any failure to parse untrusted bytes is the sender's: refuse them, go on
            return MalformedMessage(f"it does not decode ({type(err).__name__}: {err})"), size


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


def split_step_bytes(model: torch.nn.Module, batch_size: int, max_length: int) -> int:
    """The most bytes one local step may exchange with the server (split learning): each way,
    two tensors of the batch's hidden states (activations and their gradients), no wider than
    the model's widest dimension, at 8 bytes an element, and their headers."""
    width = max((max(p.shape, default=1) for p in model.parameters()), default=1)
    return 2 * batch_size * (max_length + PROMPT_TOKENS) * width * 8 + 2**20


def answer_row(client_id: int, numbers: dict | str, size: int, bytes_down: int, rejection: str | None) -> ClientRow:
    """A party's row from its checked numbers; zeros where they were refused (`numbers` is then why)."""
    n = numbers if isinstance(numbers, dict) else {}
    split_up, split_down = n.get("split_bytes_up", 0), n.get("split_bytes_down", 0)
    return ClientRow(client_id, n.get("num_samples", 0), n.get("train_loss", 0.0), size + split_up, bytes_down + split_down,
                     rejection is None, n.get("steps", 0), split_up, split_down, rejection_code(rejection))

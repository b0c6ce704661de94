"""Where a deployed federation's clients run: remote parties, each acting as the client id its
key is bound to (after Flower's Strategy/Grid split: fedllm's `Server` decides, this fleet
carries out). Transport-neutral: what is asked of the parties and how their replies are
checked is here; how a message reaches a party is the `Transport`'s (Flower's Grid:
fedllm.deploy.flower.fleet). Each round sends the server's download bytes to the sampled
parties and hands each upload to the round's `admit`, validated exactly as the simulation
validates its own, with every number of a reply checked against what the server knows
(reports.check_train_report: a party's weight is recomputed as the simulation gives it, never
above its reported size); a party that does not answer within `federation.round_timeout_s`
is recorded missing and the round goes on without it. The server holds no party's data:
before round 0 each party reports its counts (the run's client sizes), and evaluation is
federated (each party scores the global adapter on its own held-out rows; the server pools
the sums)."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Protocol

import torch

from fedllm.data import PreparedData
from fedllm.data.prepare import prepare_local_data
from fedllm.deploy.party import recipe_digests
from fedllm.deploy.reports import TrainLimits, check_eval, check_sizes, check_train_report, pooled_eval
from fedllm.metrics import rejection_code
from fedllm.registry import RecipeError
from fedllm.server import ClientRow, Round, Server
from fedllm.wire import MalformedMessage, deserialize

log = logging.getLogger("fedllm")
STATE_ROUND = "state_round"  # the server's record of a party: the last round whose upload it accepted
# An adapter's own loop takes steps its options set beyond client.max_steps (SFPrompt's local-loss
# and split steps): a reported step count may exceed the recipe's by this much
OWN_LOOP_STEPS = 10_000
PROMPT_TOKENS = 2**10  # room for the virtual tokens an adapter prepends to a split step's hidden states
Job = Callable[[int], dict]  # client id -> the JSON job of its message


class Transport(Protocol):
    """How messages reach the parties and come back (Flower's Grid: flower.fleet.GridTransport).
    A reply is a party's JSON numbers (a dict) and, for `train`, its upload bytes; a str says
    why there is none."""

    def connected(self) -> set[int]:
        """The client ids whose party is connected now."""

    def ask(self, kind: str, wanted: list[int], job: Job, payload: bytes, deadline: float, group: str) -> dict[int, dict | str]:
        """Message `kind` to each wanted party once connected, until all answered or `deadline`."""

    def exchange(self, t: int, sampled: list[int], job: Job, payload: bytes) -> tuple[dict, set[int]]:
        """Round t's train messages and their answers (client id -> (numbers, upload bytes) or why
        none), within the recipe's timeout, retries and min_clients; and the clients sent to."""


class PartiesFleet:
    """The parties of a deployment behind `transport`. `eval_data`: a held-out file the server
    owns (fedllm serve --eval-data), or None."""

    trains_here = False

    def __init__(self, recipe, run_dir: Path, transport: Transport, eval_data: str | None = None):
        self.recipe, self.run_dir, self.transport, self.eval_data = recipe, Path(run_dir), transport, eval_data
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
        replies = self.transport.ask("query.sizes", wanted, job, b"", time.time() + f.join_timeout_s, "sizes")
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
        asked = [cid for cid in holders if cid in self.transport.connected()]
        job = lambda cid: {"digests": self.digests, "client_id": cid, "batch_size": r.eval.per_device_eval_batch_size,  # noqa: E731
                           "max_batches": r.eval.max_batches, "timeout_s": r.federation.round_timeout_s}
        wire = self.server.channel.down_wire(self.server.global_state, {})
        replies = self.transport.ask("evaluate", asked, job, wire, time.time() + r.federation.round_timeout_s, f"eval-{rounds_done}")
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

    def state_round(self, client_id: int) -> int:
        record = self.store.get(client_id)
        return int(record[STATE_ROUND]) if record else -1

    # ---- one round ---------------------------------------------------------------------
    def run_round(self, t: int, round: Round, lr: float, progress=None) -> list[ClientRow]:
        r = self.recipe
        sampled = self.participation.sampled(t)
        wire = self.server.down_wire()
        f, run_info = r.federation, asdict(self.run_info)
        job = lambda cid: {"round": t, "lr": lr, "state_round": self.state_round(cid), "run_info": run_info,  # noqa: E731
                           "digests": self.digests, "client_id": cid, "timeout_s": f.round_timeout_s}
        answers, sent = self.transport.exchange(t, sampled, job, wire)
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

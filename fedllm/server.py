"""The server half of every round, whatever drives it (sync and async simulation, a Flower
deployment, the Trainer callback): the global and server state, the download, admitting
untrusted uploads, and the ONE round tail that turns the admitted uploads into the next
global state (or refuses it). A driver only decides where clients run and when a round ends:

    round = server.open(t, lr)
    rejection = round.admit(client_id, message, weight)   # per upload, as it arrives
    round.close(rows)                                      # the tail; rows (ClientRow) updated in place
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, fields
from typing import Callable

import torch

from fedllm.channel import Channel, Downlink
from fedllm.collectors import AGGREGATE_NOT_FINITE, default_collector, finite_or_previous, message_template, misfit
from fedllm.distributed import Reducer, all_gather_rows
from fedllm.metrics import rejection_code
from fedllm.state import State
from fedllm.strategies.base import RoundInfo, Strategy, Update
from fedllm.wire import Erased, MalformedMessage, WireContext

log = logging.getLogger("fedllm")


@dataclass
class ClientRow:
    """One client's part of a round, as every driver records it. bytes_up/down are the client's
    whole traffic; split_bytes_* the part its local round itself exchanged with the server
    (split learning's activations and gradients); rejected: metrics.rejection_code of why the
    upload was left out (0: accepted); missing: why a deployed party never answered."""

    client: int
    num_samples: int = 0
    train_loss: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    accepted: bool = False
    steps: int = 0
    split_bytes_up: int = 0
    split_bytes_down: int = 0
    rejected: int = 0
    missing: str | None = None

    def numbers(self) -> list[float]:
        """The row as numbers (for a collective over ranks, or a checkpoint): every field but `missing`."""
        return [float(getattr(self, name)) for name in NUMBER_FIELDS]

    @classmethod
    def from_numbers(cls, values) -> "ClientRow":
        kinds = {f.name: f.type for f in fields(cls)}
        cast = {"int": int, "float": float, "bool": bool}
        return cls(**{name: cast[kinds[name]](v) for name, v in zip(NUMBER_FIELDS, values)})

    def refuse(self, reason: str) -> None:
        self.accepted, self.rejected = False, rejection_code(reason)

    def as_dict(self) -> dict:
        out = asdict(self)
        if out["missing"] is None:
            del out["missing"]
        return out


NUMBER_FIELDS = tuple(f.name for f in fields(ClientRow) if f.name != "missing")


def gather_rows(rows: list[ClientRow], device) -> list[ClientRow]:
    """Every rank's rows, in client order (the same however the clients split over the ranks)."""
    table = all_gather_rows(torch.tensor([r.numbers() for r in rows], dtype=torch.float64).reshape(-1, len(NUMBER_FIELDS)),
                            device)
    return sorted((ClientRow.from_numbers(values) for values in table.tolist()), key=lambda r: r.client)


@dataclass
class RoundResult:
    global_state: State
    server_state: State
    stats: list[ClientRow]
    seconds: float
    extra: dict = field(default_factory=dict)  # e.g. simulated time (fedllm.asynchrony)


class Server:
    """Owns x^t and the strategy's server state. `own_aggregation`: an adapter's own aggregation
    and download (Ferret's coordinate space under a plain mean), or None; `attack` and
    `byzantine`: a simulated attack, which needs every message (collectors.Gathered)."""

    def __init__(self, strategy: Strategy, channel: Channel, global_state: State, server_state: State, reducer: Reducer,
                 *, num_clients: int, local_steps: int, seed: int, own_aggregation=None, attack=None,
                 byzantine: frozenset = frozenset()):
        self.strategy, self.channel, self.reducer = strategy, channel, reducer
        self.global_state, self.server_state = global_state, server_state
        self.num_clients, self.local_steps, self.seed = num_clients, local_steps, seed
        self.own_aggregation, self.attack, self.byzantine = own_aggregation, attack, frozenset(byzantine)
        # a decoded upload holds at most Δ and extras the size of the state (SCAFFOLD's Δc), plus small fields
        self.max_elements = 2 * sum(t.numel() for t in global_state.values()) + 2**20

    def downlink(self, t: int, device, last_round: Callable[[int, int], int]) -> Downlink:
        """x^t and the broadcast as clients hold them: one real message, or the adapter's own
        protocol (clients apply the aggregates of the rounds they missed; x^t is the server's).
        `last_round(client, t)`: the last round before t the client took part in."""
        if self.own_aggregation is None:
            return self.channel.down(self.global_state, self.strategy.broadcast(self.server_state), device,
                                     WireContext(t, -1, self.seed))
        return Downlink(self.global_state, {},
                        lambda cid: self.own_aggregation.download_bytes(t, last_round(cid, t), self.global_state, cid))

    def down_wire(self) -> bytes:
        """x^t and the broadcast as the bytes a remote party downloads."""
        return self.channel.down_wire(self.global_state, self.strategy.broadcast(self.server_state))

    def wire_context(self, t: int, client_id: int) -> WireContext:
        return WireContext(t, client_id, self.seed, max_elements=self.max_elements)

    def open(self, t: int, lr: float, version: int | None = None) -> "Round":
        """Round t's collector and what a decoded upload must look like (`version`: the
        aggregation's index where it differs from the logged round, as in asynchronous runs)."""
        version = t if version is None else version
        if self.own_aggregation is not None:  # the adapter checks its own wire format
            return Round(self, t, version, lr, self.own_aggregation.collector(version), expected=None)
        expected = message_template(self.strategy, self.global_state)
        collect = default_collector(self.strategy, lambda: expected, version, self.attack, self.byzantine)
        return Round(self, t, version, lr, collect, expected)

    def parts(self) -> dict:
        """What a checkpoint keeps of the server."""
        return {"global": self.global_state, "server_state": self.server_state}


class Round:
    """One aggregation: uploads admitted into its collector, then `close` once. `expected`: the
    keys, shapes and kinds a decoded upload must have (None: an adapter's own wire format)."""

    def __init__(self, server: Server, t: int, version: int, lr: float, collect, expected: Update | None):
        self.server, self.t, self.version, self.lr, self.collect, self.expected = server, t, version, lr, collect, expected

    def admit(self, client_id: int, message, weight: float, sink=None) -> str | None:
        """An untrusted upload enters the collector (or `sink`, e.g. an asynchronous upload held
        until it arrives) only if it decoded, with the expected keys, shapes and kinds and finite
        values; else why not (one of metrics.REJECTIONS)."""
        if isinstance(message, Erased):
            log.info("round %d: client %d's upload was lost on the simulated link", self.t + 1, client_id)
            return "erased"
        if isinstance(message, MalformedMessage):
            problem = str(message)
        else:
            problem = misfit(message, self.expected) if self.expected is not None else None
        if problem is None and (sink or self.collect).add(client_id, message, weight):
            return None
        what = f"a malformed update ({problem})" if problem else "a non-finite update (NaN/Inf)"
        log.warning("round %d: client %d sent %s; dropped from the round", self.t + 1, client_id, what)
        return "malformed" if problem else "non_finite"

    def close(self, rows: list[ClientRow], where: str | None = None) -> bool:
        """The round's tail: the accepted uploads of `rows` become the server's new state, unless
        none was accepted (and the strategy releases nothing then) or their aggregate is not
        finite (refused: the rows are recorded rejected). Whether a new state was applied."""
        s, where = self.server, where or f"round {self.t + 1}"
        accepted = [r.client for r in rows if r.accepted]
        if not accepted and not s.strategy.releases_when_empty:
            log.warning("%s: no client update was accepted; the global model is unchanged", where)
            self.collect.unchanged()
            return False
        info = lambda weight: RoundInfo(self.version, accepted, weight, s.num_clients, lr=self.lr,  # noqa: E731
                                        local_steps=s.local_steps)
        # an adapter's own aggregation applies its aggregate to the global state in place: nothing to keep
        previous = (s.global_state, s.server_state) if s.own_aggregation is None else None
        new = self.collect.finish(s.strategy, s.global_state, s.server_state, info, s.reducer)
        forged = set(getattr(self.collect, "forged_non_finite", ()))  # filtered where it arrives: after the gather
        for r in rows:
            if r.client in forged:
                r.refuse("non_finite")
        kept = [r.client for r in rows if r.accepted]
        s.global_state, s.server_state, applied = finite_or_previous(where, new, previous, kept)
        if not applied:
            for r in rows:
                if r.accepted:
                    r.refuse(AGGREGATE_NOT_FINITE)
        return applied

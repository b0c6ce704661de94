"""Federations on a simulated clock: client-rounds take the time their device model gives
them (fedllm.devices: download + training + upload), clients are sampled only while online,
and the server updates as updates arrive.

- sync: a round starts when the last one ended, draws its clients among those online then
  (uniformly, as a server can only select devices that check in: Bonawitz et al. 2019, §2),
  and waits for its slowest client (`SyncClock`).
- async (FedAsync, Xie, Koyejo & Gupta 2019, Algorithm 1): each arrival is applied at once,
  x_t = (1 − α_t)·x_{t−1} + α_t·x_new with α_t = α·s(t − τ) (fedllm.strategies.staleness).
  x_new = x_τ + Δ, so the mixed step is α_t·(Δ + x_τ − x_{t−1}), fed to the strategy as its
  mean update (fedavg with server_lr 1 applies it as is). Arrivals at one instant are one event.
- buffered (FedBuff, Nguyen et al. 2022, Algorithm 1): arrivals add s(τ)·Δ to a buffer; every
  K of them the buffer's weighted mean goes to the strategy (server_lr is FedBuff's η_g); a
  robust rule (median, Krum, ...) gets the buffer's K weighted updates instead. K is
  independent of the logged round: a buffer may fill across two of them.

Availability decides who can start a round; a client that goes offline during its round
still delivers (mid-round dropouts are not simulated). At most `max_concurrency` clients
train at once; a freed slot takes the next online client of the uniform sampler's draws
(busy and offline ones skipped); with no client online, the slot waits until one comes
online. A client receives the global state and the strategy's broadcast (e.g. SCAFFOLD's c)
of the version it starts from, and trains at dispatch: its
decoded upload is held until its simulated arrival (download + training + upload later,
the bytes being the channel's real ones). τ = server versions since its start. A logged
round is `clients_per_round` arrivals, so rounds, eval and checkpoints mean the same client
work in every mode. Events are ordered by (simulated arrival, dispatch number): a run is
deterministic, and its checkpoint holds the clock, the clients in flight with their held
uploads, the buffer, and (async) the global versions they started from: a resume is bit-exact."""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from fedllm.collectors import flat, unflat
from fedllm.devices import Devices
from fedllm.registry import STALENESS, RecipeError
from fedllm.samplers import Uniform
from fedllm.seeds import derive
from fedllm.server import ClientRow, Server
from fedllm.state import State, is_finite
from fedllm.strategies.base import Update
from fedllm.training import round_learning_rate


class ClientRunner(Protocol):
    """Where an asynchronous run's clients train (fedllm.fleet.LocalFleet): one client-round,
    from the download to `admit`, and its row."""

    def client_round(self, t: int, client_id: int, down, admit, lr: float, progress=None) -> ClientRow: ...


def check_sampler(devices: Devices, participation) -> None:
    if not devices.always_online and not isinstance(participation.sampler, Uniform):
        raise RecipeError("simulated availability (federation.devices online_fraction < 1) samples uniformly among the "
                          "online clients; set federation.sampler.name=uniform")


class SyncClock:
    """Synchronous rounds on the simulated clock, and who each round samples. Its record
    (round starts, ends, draws) is checkpointed: a round's length depends on the bytes its
    clients really sent, and the next round's draw on when it starts."""

    def __init__(self, devices: Devices, participation, seed: int):
        check_sampler(devices, participation)
        self.devices, self.participation, self.seed = devices, participation, seed
        self.num_clients, self.k = participation.num_clients, participation.k
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.drawn: list[list[int]] = []

    def sampled(self, t: int) -> list[int]:
        while len(self.drawn) <= t:
            self.draw(len(self.drawn))
        return self.drawn[t]

    def last_round(self, client_id: int, before: int) -> int:
        """The last round < `before` in which the client was sampled (0 if none)."""
        return next((s for s in range(before - 1, -1, -1) if client_id in self.sampled(s)), 0)

    def draw(self, t: int) -> None:
        if self.devices.always_online:
            self.starts.append(self.ends[t - 1] if t and len(self.ends) >= t else math.nan)
            self.drawn.append(self.participation.sampled(t))
            return
        if len(self.ends) < t:
            raise RuntimeError(f"round {t}'s clients depend on when round {t - 1} ended, which is not known yet")
        start = self.ends[t - 1] if t else 0.0
        online = self.online_at(start)
        if not online:  # nobody to select: the round starts when the first client comes online
            start = min(self.devices.next_online(c, start) for c in range(self.num_clients))
            online = self.online_at(start)
        order = np.random.default_rng(derive(self.seed, t, tag="available-sampler")).permutation(self.num_clients)
        self.starts.append(start)
        self.drawn.append(sorted(int(c) for c in [c for c in order if c in online][: self.k]))

    def online_at(self, time: float) -> set[int]:
        return {c for c in range(self.num_clients) if self.devices.online(c, time)}

    def metrics(self, t: int, stats: list[ClientRow]) -> dict:
        """Round t's simulated end and its clients' time spent waiting for its straggler."""
        self.sampled(t)
        durations = [self.devices.duration(s.client, s.bytes_down, s.bytes_up) for s in stats]
        longest = max(durations, default=0.0)
        if math.isnan(self.starts[t]):  # always online: the start is the last round's end
            self.starts[t] = self.ends[t - 1] if t else 0.0
        del self.ends[t:]
        self.ends.append(self.starts[t] + longest)
        idle = sum(longest - d for d in durations) / (len(durations) * longest) if longest else 0.0
        out = {"sim_time": self.ends[t], "straggler_wait": idle}
        if not self.devices.always_online:
            out["online_clients"] = len(self.online_at(self.starts[t]))
        return out

    def state(self) -> State:
        rounds = len(self.ends)
        drawn = torch.full((rounds, max(self.k, 1)), -1, dtype=torch.int64)
        for t in range(rounds):
            drawn[t, : len(self.drawn[t])] = torch.tensor(self.drawn[t], dtype=torch.int64)
        return {"starts": torch.tensor(self.starts[:rounds], dtype=torch.float64),
                "ends": torch.tensor(self.ends, dtype=torch.float64), "drawn": drawn}

    def load_state(self, state: State) -> None:
        self.starts, self.ends = state["starts"].tolist(), state["ends"].tolist()
        self.drawn = [[c for c in row if c >= 0] for row in state["drawn"].tolist()]


@dataclass(order=True)
class Flight:
    """One client-round under way, ordered by (finish, seq); it trained at dispatch."""

    finish: float
    seq: int  # dispatch number: breaks ties in finish time
    client: int = field(compare=False)
    wave: int = field(compare=False)  # the sampler draw it came from; its local seed derives from (wave, client)
    version: int = field(compare=False)  # the server version it started from
    round: int = field(compare=False)  # the logged round at dispatch (its learning rate)
    start: float = field(compare=False)
    row: ClientRow | None = field(compare=False, default=None)  # its row in the round it arrives in
    message: Update | None = field(compare=False, default=None)  # its decoded upload; None: rejected
    weight: float = field(compare=False, default=0.0)


class Hold:
    """A collector for one upload at dispatch: checks it as the mean would (finite) and keeps it."""

    def __init__(self):
        self.message, self.weight = None, 0.0

    def add(self, client_id: int, message: Update, weight: float) -> bool:
        if not is_finite(flat(message)):
            return False
        self.message, self.weight = message, weight
        return True


class Adjusted:
    """A collector that receives Δ' = scale·(Δ + shift) in place of Δ (extras as sent)."""

    def __init__(self, inner, scale: float, shift: State | None):
        self.inner, self.scale, self.shift = inner, scale, shift

    def add(self, client_id: int, message: Update, weight: float) -> bool:
        delta = {}
        for k, t in message.delta.items():
            if self.shift is not None:
                t = t + self.shift[k].to(t.device, t.dtype)
            delta[k] = t * self.scale
        return self.inner.add(client_id, Update(delta, message.extras), weight)


class AsyncRounds:
    """Rounds on the simulated clock; the `server` aggregates (its one round tail), `clients`
    (the fleet) train each dispatched client."""

    def __init__(self, fed_cfg, client_cfg, rounds: int, participation, devices: Devices, server: Server,
                 clients: ClientRunner, device):
        check_sampler(devices, participation)
        self.mode, self.client_cfg, self.rounds = fed_cfg.mode, client_cfg, rounds
        self.k, self.num_clients = fed_cfg.sampled_per_round(), fed_cfg.num_clients
        self.concurrency = fed_cfg.max_concurrency or self.k
        self.buffer_size = fed_cfg.buffer_size or self.k  # buffered only: async applies each event
        self.staleness = STALENESS.build(fed_cfg.staleness, "federation.staleness")
        self.mixing = fed_cfg.async_mixing if self.mode == "async" else 1.0
        self.participation, self.devices, self.server, self.clients = participation, devices, server, clients
        self.device = device
        self.now = 0.0
        self.version = self.arrivals = self.seq = self.wave = self.pos = 0
        self.flights: list[Flight] = []  # a heap
        self.pending: list[Flight] = []  # arrived, not yet applied (FedBuff's buffer)
        self.versions: dict[int, State] = {}  # async: the global states in-flight clients started from (x_τ)

    # ---- one logged round -------------------------------------------------------------
    def round(self, t: int, progress=None) -> tuple[list[ClientRow], dict]:
        """Round t: arrivals until (t + 1)·clients_per_round have arrived (at least one event).
        Returns the arrivals' rows and the round's metrics."""
        rows, stale = [], []
        while self.arrivals < (t + 1) * self.k or not rows:
            self.fill(t, progress)
            wake = self.wake_time()
            if not self.flights or wake < self.flights[0].finish:
                if math.isinf(wake):
                    raise RuntimeError("no client is training and none will come online")
                self.now = wake  # a slot is free and the next client comes online before any arrival
                continue
            for flight in self.next_event():
                self.now = flight.finish
                rows.append(flight.row), stale.append(self.version - flight.version)
                self.arrivals += 1
                self.pending.append(flight)
                if self.mode == "buffered" and len(self.pending) >= self.buffer_size:
                    self.apply(t)
            if self.pending and self.mode == "async":  # simultaneous arrivals: one FedAsync event
                self.apply(t)
        extra = {"sim_time": self.now, "server_version": self.version, "staleness_mean": sum(stale) / len(stale),
                 "staleness_max": max(stale), "in_flight": len(self.flights), "buffered": len(self.pending)}
        if not self.devices.always_online:
            extra["online_clients"] = sum(self.devices.online(c, self.now) for c in range(self.num_clients))
        return rows, extra

    def adjusted(self, collect, tau: int, start: State | None, current: State):
        scale = self.mixing * self.staleness.weight(tau)
        shift = None
        if self.mode == "async" and tau > 0:  # FedAsync mixes the client's whole model x_τ + Δ
            shift = {k: start[k].float() - current[k].float() for k in current}
        return collect if scale == 1.0 and shift is None else Adjusted(collect, scale, shift)

    def apply(self, t: int) -> None:
        """The pending arrivals, each weighed by its staleness, become one new server version
        through the server's round tail (none if their aggregate is not finite: refused, the
        arrivals' rows recorded rejected — a buffer filled across two logged rounds updates the
        rows of the earlier one after they were logged)."""
        arrived, self.pending = self.pending, []
        lr = round_learning_rate(self.client_cfg, arrived[-1].round, self.rounds)
        round = self.server.open(t, lr, version=self.version)
        current = self.server.global_state
        for f in arrived:
            if f.message is not None:
                tau = self.version - f.version
                self.adjusted(round.collect, tau, self.versions.get(f.version), current).add(f.client, f.message, f.weight)
        held = [f for f in arrived if f.message is not None]
        if round.close([f.row for f in held], where=f"round {t + 1} (server version {self.version + 1})"):
            self.version += 1
            self.prune()

    # ---- the event queue ----------------------------------------------------------------
    def fill(self, t: int, progress=None) -> None:
        """Dispatches online clients into the free slots, now: each downloads the current
        version and its broadcast, trains, and is scheduled to arrive when its upload ends."""
        down = dispatch = None
        lr = round_learning_rate(self.client_cfg, t, self.rounds)
        while len(self.flights) < self.concurrency:
            picked = self.next_client()
            if picked is None:
                return
            client, wave = picked
            if down is None:
                dispatch = self.server.open(t, lr, version=self.version)  # what a decoded upload must look like
                down = self.server.channel.down(self.server.global_state,
                                                self.server.strategy.broadcast(self.server.server_state), self.device)
                if self.mode == "async":
                    self.versions.setdefault(self.version, self.server.global_state)
            hold = Hold()
            row = self.clients.client_round(wave, client, down, lambda c, m, w: dispatch.admit(c, m, w, sink=hold), lr,
                                            progress)
            finish = self.now + self.devices.duration(client, row.bytes_down, row.bytes_up)
            heapq.heappush(self.flights, Flight(finish, self.seq, client, wave, self.version, t, self.now, row,
                                                hold.message, hold.weight))
            self.seq += 1

    def next_client(self) -> tuple[int, int] | None:
        """The next client of the sampler's draws, round after round, that is online and not
        training (None if there is none now)."""
        busy = {f.client for f in self.flights}
        idle = {c for c in range(self.num_clients) if c not in busy and self.devices.online(c, self.now)}
        if not idle:
            return None
        while True:
            drawn = self.participation.sampled(self.wave)
            if self.pos >= len(drawn):
                self.wave, self.pos = self.wave + 1, 0
                continue
            client = drawn[self.pos]
            self.pos += 1
            if client in idle:
                return client, self.wave

    def wake_time(self) -> float:
        """When a free slot can next be filled: the first time an idle client comes online."""
        if len(self.flights) >= self.concurrency:
            return math.inf
        busy = {f.client for f in self.flights}
        return min((self.devices.next_online(c, self.now) for c in range(self.num_clients) if c not in busy),
                   default=math.inf)

    def next_event(self) -> list[Flight]:
        """The earliest arrival, with every other one at the same simulated instant."""
        first = heapq.heappop(self.flights)
        group = [first]
        while self.flights and self.flights[0].finish == first.finish:
            group.append(heapq.heappop(self.flights))
        if self.mode == "buffered":  # one arrival at a time; the others wait in the queue, in order
            for flight in group[1:]:
                heapq.heappush(self.flights, flight)
            group = group[:1]
        return group

    def prune(self) -> None:
        """Forgets the versions no client in flight started from."""
        live = {f.version for f in self.flights}
        self.versions = {v: s for v, s in self.versions.items() if v in live}

    # ---- checkpoint ---------------------------------------------------------------------
    def state(self) -> State:
        flights = sorted(self.flights) + self.pending  # in flight first, then the buffer in arrival order
        out = {
            "clock": torch.tensor([self.now], dtype=torch.float64),
            "counters": torch.tensor([self.version, self.arrivals, self.seq, self.wave, self.pos, len(self.flights)],
                                     dtype=torch.int64),
            "flights": torch.tensor([[f.seq, f.client, f.wave, f.version, f.round, f.message is not None] for f in flights],
                                    dtype=torch.int64).reshape(-1, 6),
            "flight_times": torch.tensor([[f.finish, f.start, f.weight] for f in flights], dtype=torch.float64).reshape(-1, 3),
            "rows": torch.tensor([f.row.numbers() for f in flights], dtype=torch.float64).reshape(len(flights), -1 if flights else 0),
        }
        for f in flights:
            if f.message is not None:
                out.update({f"message/{f.seq}/{part}/{k}": t.detach().clone()
                            for (part, k), t in flat(f.message).items()})
        for v in sorted({f.version for f in self.flights} & self.versions.keys()):
            out.update({f"version/{v}/{k}": t.detach().clone() for k, t in self.versions[v].items()})
        return out

    def load_state(self, state: State) -> None:
        if "rows" not in state:
            raise RecipeError("this checkpoint's asynchronous clock was written by an older fedllm, whose in-flight "
                              "clients trained at arrival: resume it with that version, or start again with `fedllm run`")
        self.now = float(state["clock"][0])
        self.version, self.arrivals, self.seq, self.wave, self.pos, in_flight = state["counters"].tolist()
        messages: dict[int, dict] = {}
        for key, tensor in state.items():
            if key.startswith("message/"):
                _, seq, part, name = key.split("/", 3)
                messages.setdefault(int(seq), {})[(part, name)] = tensor
        flights = []
        for (seq, client, wave, version, round, held), (finish, start, weight), row in zip(
                state["flights"].tolist(), state["flight_times"].tolist(), state["rows"].tolist()):
            message = unflat(messages[seq]) if held else None
            flights.append(Flight(finish, seq, client, wave, version, round, start, ClientRow.from_numbers(row), message,
                                  weight))
        self.flights, self.pending = flights[:in_flight], flights[in_flight:]
        heapq.heapify(self.flights)
        self.versions, global_state = {}, self.server.global_state
        for key, tensor in state.items():
            if key.startswith("version/"):
                _, v, name = key.split("/", 2)
                self.versions.setdefault(int(v), {})[name] = tensor.to(global_state[name].device, global_state[name].dtype)

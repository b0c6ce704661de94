"""Federations on a simulated clock: client-rounds take the time their device model gives
them (fedllm.devices), and the server updates as updates arrive.

- sync: every round waits for its slowest client; the clock only measures (`SyncClock`).
- async (FedAsync, Xie, Koyejo & Gupta 2019, Algorithm 1): each arrival is applied at once,
  x_t = (1 − α_t)·x_{t−1} + α_t·x_new with α_t = α·s(t − τ) (fedllm.strategies.staleness).
  x_new = x_τ + Δ, so the mixed step is α_t·(Δ + x_τ − x_{t−1}), fed to the strategy as its
  mean update (fedavg with server_lr 1 applies it as is). Arrivals at one instant are one event.
- buffered (FedBuff, Nguyen et al. 2022, Algorithm 1): arrivals add s(τ)·Δ to a buffer; every
  K of them the buffer's weighted mean goes to the strategy (server_lr is FedBuff's η_g).

At most `max_concurrency` clients train at once; a freed slot takes the next client of the
uniform sampler's draws (busy ones skipped). Each update carries the version it started
from; τ = versions since. A logged round is `clients_per_round` arrivals, so rounds, eval
and checkpoints mean the same client work in every mode. Events are ordered by (simulated
finish time, dispatch number): a run is deterministic, and its checkpoint holds the clock,
the in-flight clients and the global versions they started from, so a resume is bit-exact.
A client trains when its update arrives, from the state it started from (the result is the
same as training at dispatch; only the states of in-flight versions are held)."""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Protocol

import torch

from fedllm.collectors import StreamedMean
from fedllm.devices import Devices
from fedllm.registry import STALENESS, RecipeError
from fedllm.state import State
from fedllm.strategies.base import ALL, RoundInfo, Strategy, Update
from fedllm.training import round_learning_rate

ACCEPTED = 5  # index of `accepted` in a stat row (fedllm.engine.STAT_COLUMNS)


class Server(Protocol):
    """What the event loop asks of the engine for one arrival."""

    def collector(self, version: int) -> StreamedMean: ...

    def client_round(self, t: int, client_id: int, down, collect, lr: float, progress=None) -> list: ...


class SyncClock:
    """Simulated time of synchronous rounds: each lasts as long as its slowest client."""

    def __init__(self, devices: Devices, participation):
        self.devices, self.participation = devices, participation
        self.ends: list[float] = []  # simulated end of each round, replayed from the sampler after a resume

    def metrics(self, t: int) -> dict:
        while len(self.ends) <= t:
            longest = max((self.devices.duration(c) for c in self.participation.sampled(len(self.ends))), default=0.0)
            self.ends.append((self.ends[-1] if self.ends else 0.0) + longest)
        durations = [self.devices.duration(c) for c in self.participation.sampled(t)]
        longest = max(durations, default=0.0)
        # the share of the sampled clients' time spent waiting for the round's straggler
        idle = sum(longest - d for d in durations) / (len(durations) * longest) if longest else 0.0
        return {"sim_time": self.ends[t], "straggler_wait": idle}


@dataclass(order=True)
class Flight:
    """One client-round under way; ordered by (finish, seq)."""

    finish: float
    seq: int  # dispatch number: breaks ties in finish time
    client: int
    wave: int  # the sampler draw it came from; its local seed derives from (wave, client)
    version: int  # the server version it started from
    round: int  # the logged round at dispatch (its learning rate)
    start: float


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
    def __init__(self, fed_cfg, client_cfg, rounds: int, participation, devices: Devices, strategy: Strategy,
                 channel, reducer, device):
        self.mode, self.client_cfg, self.rounds = fed_cfg.mode, client_cfg, rounds
        self.k, self.num_clients = fed_cfg.sampled_per_round(), fed_cfg.num_clients
        self.concurrency = fed_cfg.max_concurrency or self.k
        self.buffer_size = fed_cfg.buffer_size or self.k  # buffered only: async applies each event
        self.staleness = STALENESS.build(fed_cfg.staleness, "federation.staleness")
        self.mixing = fed_cfg.async_mixing if self.mode == "async" else 1.0
        self.participation, self.devices, self.strategy = participation, devices, strategy
        self.channel, self.reducer, self.device = channel, reducer, device
        if strategy.needs == ALL:
            raise RecipeError(f"federation.mode={self.mode} aggregates a running mean; a strategy that needs every "
                              "update (robust rules) runs in federation.mode=sync")
        self.now = 0.0
        self.version = self.arrivals = self.seq = self.wave = self.pos = 0
        self.flights: list[Flight] = []  # a heap
        self.versions: dict[int, State] = {}  # the global states in-flight clients started from

    # ---- one logged round -------------------------------------------------------------
    def round(self, t: int, global_state: State, server_state: State, server: Server, progress=None):
        """Round t: arrivals until (t + 1)·clients_per_round have arrived (at least one event).
        Returns (global, server_state, stat rows, metrics)."""
        rows, stale, collect, since_apply = [], [], None, []
        while self.arrivals < (t + 1) * self.k or not rows:
            self.fill(t, global_state)
            for flight in self.next_event():
                self.now = flight.finish
                collect = collect or server.collector(self.version)
                tau = self.version - flight.version
                start = self.versions[flight.version]
                down = self.channel.down(start, self.strategy.broadcast(server_state), self.device)
                lr = round_learning_rate(self.client_cfg, flight.round, self.rounds)
                row = server.client_round(flight.wave, flight.client, down, self.adjusted(collect, tau, start, global_state),
                                          lr, progress)
                rows.append(row), stale.append(tau), since_apply.append((flight.client, row[ACCEPTED], lr))
                self.arrivals += 1
                if self.mode == "buffered" and len(since_apply) >= self.buffer_size:
                    global_state, server_state = self.apply(collect, since_apply, global_state, server_state)
                    collect, since_apply = None, []
            if since_apply and self.mode == "async":  # simultaneous arrivals: one FedAsync event
                global_state, server_state = self.apply(collect, since_apply, global_state, server_state)
                collect, since_apply = None, []
        assert not since_apply, "a logged round ends with an empty buffer (buffer_size divides clients_per_round)"
        extra = {"sim_time": self.now, "server_version": self.version, "staleness_mean": sum(stale) / len(stale),
                 "staleness_max": max(stale), "in_flight": len(self.flights)}
        return global_state, server_state, rows, extra

    def adjusted(self, collect, tau: int, start: State, current: State):
        scale = self.mixing * self.staleness.weight(tau)
        shift = None
        if self.mode == "async" and tau > 0:  # FedAsync mixes the client's whole model x_τ + Δ
            shift = {k: start[k].float() - current[k].float() for k in current}
        return collect if scale == 1.0 and shift is None else Adjusted(collect, scale, shift)

    def apply(self, collect, arrived: list, global_state: State, server_state: State):
        accepted = [client for client, ok, _ in arrived if ok]
        if not accepted and not self.strategy.releases_when_empty:
            collect.unchanged()
            return global_state, server_state
        lr = arrived[-1][2]
        info = lambda weight: RoundInfo(self.version, accepted, weight, self.num_clients, lr=lr,  # noqa: E731
                                        local_steps=self.client_cfg.max_steps or 0)
        new_global, server_state = collect.finish(self.strategy, global_state, server_state, info, self.reducer)
        self.version += 1
        self.prune()
        return new_global, server_state

    # ---- the event queue ----------------------------------------------------------------
    def fill(self, t: int, global_state: State) -> None:
        """Dispatches clients into the free slots, now, from the current version."""
        while len(self.flights) < self.concurrency:
            client, wave = self.next_client()
            self.versions.setdefault(self.version, global_state)
            flight = Flight(self.now + self.devices.duration(client), self.seq, client, wave, self.version, t, self.now)
            heapq.heappush(self.flights, flight)
            self.seq += 1

    def next_client(self) -> tuple[int, int]:
        """The next client of the sampler's draws, round after round, that is not training."""
        busy = {f.client for f in self.flights}
        while True:
            drawn = self.participation.sampled(self.wave)
            if self.pos >= len(drawn):
                self.wave, self.pos = self.wave + 1, 0
                continue
            client = drawn[self.pos]
            self.pos += 1
            if client not in busy:
                return client, self.wave

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
        flights = sorted(self.flights)
        out = {
            "clock": torch.tensor([self.now], dtype=torch.float64),
            "counters": torch.tensor([self.version, self.arrivals, self.seq, self.wave, self.pos], dtype=torch.int64),
            "flights": torch.tensor([[f.seq, f.client, f.wave, f.version, f.round] for f in flights], dtype=torch.int64).reshape(-1, 5),
            "flight_times": torch.tensor([[f.finish, f.start] for f in flights], dtype=torch.float64).reshape(-1, 2),
        }
        for v in sorted({f.version for f in flights}):
            out.update({f"version/{v}/{k}": t.detach().clone() for k, t in self.versions[v].items()})
        return out

    def load_state(self, state: State, global_state: State) -> None:
        self.now = float(state["clock"][0])
        self.version, self.arrivals, self.seq, self.wave, self.pos = state["counters"].tolist()
        self.flights = [Flight(finish, seq, client, wave, version, round, start)
                        for (seq, client, wave, version, round), (finish, start)
                        in zip(state["flights"].tolist(), state["flight_times"].tolist())]
        heapq.heapify(self.flights)
        self.versions = {}
        for key, tensor in state.items():
            if key.startswith("version/"):
                _, v, name = key.split("/", 2)
                self.versions.setdefault(int(v), {})[name] = tensor.to(global_state[name].device, global_state[name].dtype)
        self.versions.setdefault(self.version, global_state)

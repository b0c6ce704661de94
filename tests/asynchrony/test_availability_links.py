"""Device availability and link time on the simulated clock: clients are online a seeded
share of the time, a client-round lasts download / downlink + compute + upload / uplink in
the channel's real bytes, sync rounds sample only online clients, the asynchronous modes
dispatch only to online clients, a FedBuff buffer may fill across logged rounds, and a
strategy's broadcast is the one of the version a client started from."""
import numpy as np
import pytest
import torch

from fedllm.adapters.base import Adapter
from fedllm.asynchrony import AsyncRounds, SyncClock
from fedllm.channel import Channel
from fedllm.devices import Availability, Devices
from fedllm.distributed import Reducer
from fedllm.recipe import ClientConfig, DeviceConfig, FederationConfig
from fedllm.registry import STRATEGIES
from fedllm.samplers import Participation, Uniform
from fedllm.server import ClientRow, Server
from fedllm.strategies.base import Update

CLIENT = ClientConfig(max_steps=1, per_device_train_batch_size=1)
DATA = [[{"input_ids": [0] * 10}]] * 6  # 10 tokens a round; at 10 tokens/s: 1 s of compute
UP = 500  # bytes each fake client uploads


def devices(**options):
    return Devices(DeviceConfig(**{"profile": "equal", "tokens_per_second": 10.0, **options}), CLIENT, DATA, 0)


def test_clients_are_online_their_share_of_the_time_from_the_seed():
    fractions = np.array([0.2, 0.5, 0.9, 1.0])
    a, b = Availability(fractions, 10.0, 0), Availability(fractions, 10.0, 0)
    grid = np.arange(0.0, 20000.0, 1.0)
    share = [np.mean([a.online(c, x) for x in grid]) for c in range(4)]
    assert share == pytest.approx([0.2, 0.5, 0.9, 1.0], abs=0.05)
    assert [b.online(2, x) for x in grid[::-7]] == [a.online(2, x) for x in grid[::-7]]  # any query order, same periods
    assert [a.online(0, x) for x in grid[:500]] != [Availability(fractions, 10.0, 1).online(0, x) for x in grid[:500]]
    offline = next(x for x in grid if not a.online(0, x))
    back = a.next_online(0, offline)
    assert back > offline and a.online(0, back) and not a.online(0, (offline + back) / 2)


def test_a_round_lasts_its_download_compute_and_upload(tmp_path):
    path = tmp_path / "devices.csv"
    path.write_text("speed,uplink_bytes_per_s,online_fraction\n1.0,100,1.0\n2.0,50,0.5\n" + "1.0,100,1.0\n" * 4)
    dev = Devices(DeviceConfig(profile="csv", path=str(path), tokens_per_second=10.0, downlink_bytes_per_s=1000.0),
                  CLIENT, DATA, 0)
    # 2000 B down at 1000 B/s + 10 tokens at speed × 10 tokens/s + 300 B up at the client's uplink
    assert dev.duration(0, 2000, 300) == pytest.approx(2.0 + 1.0 + 3.0)
    assert dev.duration(1, 2000, 300) == pytest.approx(2.0 + 0.5 + 6.0)
    assert not dev.always_online and devices().always_online and devices().duration(0, 1e9, 1e9) == 1.0


def test_sync_rounds_sample_only_online_clients_and_last_to_their_slowest_transfer():
    dev = devices(online_fraction=0.5, mean_online_s=3.0, uplink_bytes_per_s=100.0)
    clock = SyncClock(dev, Participation(Uniform(), 6, 3, 0), seed=0)
    sizes = []
    for t in range(8):
        drawn = clock.sampled(t)
        start = clock.starts[t]
        online = {c for c in range(6) if dev.online(c, start)}
        assert set(drawn) <= online and len(drawn) == min(3, len(online)) > 0
        sizes.append(len(online))
        stats = [ClientRow(c, bytes_down=0, bytes_up=100 * (c + 1)) for c in drawn]
        row = clock.metrics(t, stats)
        # the slowest client: 1 s of compute + its upload of 100·(c + 1) bytes at 100 B/s
        assert row["sim_time"] == pytest.approx(start + 1.0 + max(drawn) + 1)
        assert row["online_clients"] == len(online)
    assert min(sizes) < 6  # some clients were offline when a round began
    again = SyncClock(dev, Participation(Uniform(), 6, 3, 0), seed=0)
    again.load_state(clock.state())
    assert [again.sampled(t) for t in range(8)] == [clock.sampled(t) for t in range(8)] and again.ends == clock.ends


class Recording(type(STRATEGIES.build({"name": "scaffold"}))):
    """SCAFFOLD that remembers (global w, its control variate c) of every server version."""

    def init(self, global_state):
        state = super().init(global_state)
        self.history = [(global_state["w"].clone(), state)]
        return state

    def aggregate(self, *args):
        new_global, state = super().aggregate(*args)
        self.history.append((new_global["w"].clone(), state))
        return new_global, state


class FakeClients:
    """Client c uploads Δ = c + 1 (and Δc = c + 1 under SCAFFOLD) of UP bytes; records what it received."""

    def __init__(self, strategy, template):
        self.strategy, self.template, self.rounds, self.seen = strategy, template, None, []

    def client_round(self, t, cid, down, admit, lr, progress=None):
        self.seen.append({"client": cid, "at": self.rounds.now, "x": down.x_t["w"].clone(),
                          "broadcast": {k: v.clone() for k, v in down.broadcast.items()}})
        extras = {k: torch.full_like(v, cid + 1.0) for k, v in self.strategy.extras_like(self.template).items()}
        rejection = admit(cid, Update({"w": torch.full((2,), cid + 1.0)}, extras), 1.0)
        return ClientRow(cid, 1, 0.0, UP, down.bytes_for(cid), rejection is None, 1)


def event_loop(strategy="fedavg", start=None, **fed):
    """An event loop over fake clients with the real Server (from `start` = (global, server state) if given)."""
    fed = FederationConfig(**{"num_clients": 6, "clients_per_round": 2, "mode": "buffered", **fed})
    strategy = Recording() if strategy == "scaffold" else STRATEGIES.build({"name": strategy})
    template = {"w": torch.zeros(2)}
    global_state, server_state = start or ({"w": torch.zeros(2)}, strategy.init(template))
    server = Server(strategy, Channel(Adapter(), []), global_state, server_state, Reducer(torch.device("cpu")),
                    num_clients=6, local_steps=1, seed=0)
    clients = FakeClients(strategy, template)
    dev = Devices(fed.devices, CLIENT, DATA, 0)
    rounds = AsyncRounds(fed, CLIENT, 10, Participation(Uniform(), 6, 2, 0), dev, server, clients, torch.device("cpu"))
    clients.rounds = rounds
    return rounds, clients, strategy


def run(rounds, t0, t1):
    """Logged rounds t0..t1 - 1: the server's (global, server state) after them, and each round's metrics."""
    rows = [rounds.round(t)[1] for t in range(t0, t1)]
    return rounds.server.global_state, rounds.server.server_state, rows


def test_async_arrivals_take_the_channels_bytes_over_the_links():
    rounds, server, _ = event_loop(mode="async", clients_per_round=1, max_concurrency=1, devices=DeviceConfig(
        profile="equal", tokens_per_second=10.0, downlink_bytes_per_s=100.0, uplink_bytes_per_s=50.0))
    down = len(Channel(Adapter(), []).down_wire({"w": torch.zeros(2)}, {}))  # the real download: x^t as one message
    _, _, rows = run(rounds, 0, 3)
    # one client at a time: download / 100 + 1 s of compute + 500 B / 50
    assert [r["sim_time"] for r in rows] == pytest.approx([(t + 1) * (down / 100 + 1 + 10) for t in range(3)])


def test_async_dispatch_goes_only_to_online_clients():
    rounds, server, _ = event_loop(max_concurrency=3, buffer_size=2, devices=DeviceConfig(
        profile="lognormal", tokens_per_second=10.0, online_fraction=0.3, mean_online_s=2.0))
    _, _, rows = run(rounds, 0, 6)
    assert len(server.seen) >= 12 and all(rounds.devices.online(d["client"], d["at"]) for d in server.seen)
    assert min(r["online_clients"] for r in rows) < 6 and min(r["in_flight"] for r in rows) < 3  # slots waited


def test_a_buffer_fills_across_logged_rounds_and_resumes_exactly():
    dev = DeviceConfig(profile="lognormal", tokens_per_second=10.0)
    rounds, server, _ = event_loop(max_concurrency=3, buffer_size=3, devices=dev, staleness={"name": "polynomial", "a": 0.5})
    g1, s1, rows = run(rounds, 0, 2)
    # K = 3 arrivals per version, 2 arrivals per logged round: versions 0 then 1, buffers 2 then 1
    assert [(r["server_version"], r["buffered"]) for r in rows] == [(0, 2), (1, 1)]
    snapshot = rounds.state()
    start = ({k: t.clone() for k, t in g1.items()}, {k: t.clone() for k, t in s1.items()})
    g_end, _, tail = run(rounds, 2, 5)
    again, _, _ = event_loop(start=start, max_concurrency=3, buffer_size=3, devices=dev,
                             staleness={"name": "polynomial", "a": 0.5})
    again.load_state(snapshot)
    g_again, _, tail_again = run(again, 2, 5)
    assert torch.equal(g_end["w"], g_again["w"]) and tail == tail_again
    assert [r["server_version"] for r in tail] == [2, 2, 3]


def test_a_client_gets_the_broadcast_of_the_version_it_started_from():
    rounds, server, strategy = event_loop("scaffold", max_concurrency=4, buffer_size=1,
                                          devices=DeviceConfig(profile="lognormal", tokens_per_second=10.0))
    _, _, rows = run(rounds, 0, 4)
    assert max(r["staleness_max"] for r in rows) > 0  # some clients' versions moved on while they trained
    for d in server.seen:  # SCAFFOLD's c as the server held it at the version of the client's x
        version = next(v for v, (w, _) in enumerate(strategy.history) if torch.equal(w, d["x"]))
        held = strategy.history[version][1]
        assert d["broadcast"].keys() == held.keys()
        assert all(torch.equal(d["broadcast"][k], held[k]) for k in held)
    assert len({float(c.sum()) for _, state in strategy.history for c in state.values()}) > 3  # c really moves


def test_a_robust_rule_runs_over_each_fedbuff_buffer():
    rounds, server, _ = event_loop("median", max_concurrency=3, buffer_size=3,
                                   devices=DeviceConfig(profile="equal", tokens_per_second=10.0))
    g, _, rows = run(rounds, 0, 3)
    assert [r["server_version"] for r in rows] == [0, 1, 2]
    # every buffer: three fresh clients, uploads Δ = c + 1; the median of each buffer is applied
    firsts = [d["client"] for d in server.seen]
    medians = [sorted(c + 1.0 for c in firsts[i:i + 3])[1] for i in (0, 3)]
    assert torch.allclose(g["w"], torch.full((2,), sum(medians)))

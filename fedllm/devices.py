"""Simulated client devices: a speed per client, drawn once from the recipe seed (or read
from a CSV), turns a local round's tokens into simulated seconds; link bandwidths turn the
channel's real message bytes into transfer seconds; online/offline periods say when a
client can be sampled. The simulated clock of fedllm.asynchrony runs on these durations,
never on wall time, so a run is a pure function of its recipe. Speeds are relative
(1 = `tokens_per_second`); tiers rank clients by speed."""
from __future__ import annotations

import bisect
import csv
import math
from pathlib import Path

import numpy as np

from fedllm.registry import RecipeError
from fedllm.seeds import derive
from fedllm.training import default_steps


def client_speeds(cfg, num_clients: int, seed: int) -> np.ndarray:
    """Relative speed of each client under the recipe's `federation.devices` (DeviceConfig)."""
    rng = np.random.default_rng(derive(seed, tag="devices"))
    if cfg.profile == "equal":
        speeds = np.ones(num_clients)
    elif cfg.profile == "uniform":
        if cfg.high < cfg.low:
            raise RecipeError(f"federation.devices needs low <= high (got low={cfg.low}, high={cfg.high})")
        speeds = rng.uniform(cfg.low, cfg.high, num_clients)
    elif cfg.profile == "lognormal":
        speeds = rng.lognormal(0.0, cfg.sigma, num_clients)
    else:
        speeds = csv_speeds(cfg.path, num_clients)
    # Wang & Gao's intertwined heterogeneity: the last clients (whom the `intertwined`
    # partitioner gives the chosen categories) are the slow ones
    slow = math.ceil(cfg.slow_fraction * num_clients)
    if slow:
        speeds[num_clients - slow:] /= cfg.slow_factor
    return speeds


LINK_COLUMNS = ("online_fraction", "downlink_bytes_per_s", "uplink_bytes_per_s")  # optional per-client CSV columns


def read_csv(path: str | None, num_clients: int) -> list[dict]:
    if not path or not Path(path).is_file():
        raise RecipeError(f"federation.devices.profile=csv needs a CSV file in federation.devices.path (got {path!r})")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "speed" not in rows[0]:
        raise RecipeError(f"{path} needs a header row with a 'speed' column and one row per client")
    if len(rows) < num_clients:
        raise RecipeError(f"{path} lists {len(rows)} client speeds; federation.num_clients is {num_clients}")
    return rows[:num_clients]


def csv_column(path: str, rows: list[dict], column: str, default: float, high: float = math.inf) -> np.ndarray:
    """One per-client number from the CSV (`default` where the column is absent), in (0, high]."""
    if column not in rows[0]:
        return np.full(len(rows), default, dtype=np.float64)
    try:
        values = np.array([float(r[column]) for r in rows])
    except (TypeError, ValueError) as err:
        raise RecipeError(f"{path}: a value of column '{column}' is not a number ({err})") from None
    if not ((values > 0) & (values <= high)).all():
        raise RecipeError(f"{path}: every {column} must be > 0" + (f" and <= {high}" if high < math.inf else ""))
    return values


def csv_speeds(path: str | None, num_clients: int) -> np.ndarray:
    return csv_column(path, read_csv(path, num_clients), "speed", 1.0)


class Availability:
    """When each client is online: alternating online and offline periods of exponential
    length (a two-state Markov process per client, the usual model of device churn), the
    online ones of mean `mean_online`, the offline ones of mean mean_online·(1 − p)/p, so
    that a client is online a share p of the time; it starts online with probability p.
    The periods are drawn lazily from the recipe seed per client: a pure function of
    (seed, client), so a resumed run sees the same ones."""

    def __init__(self, fractions: np.ndarray, mean_online: float, seed: int):
        self.fractions, self.mean_online, self.seed = fractions, mean_online, seed
        self.always = bool((fractions >= 1.0).all())
        self.rngs: dict[int, np.random.Generator] = {}
        self.first: dict[int, bool] = {}  # online at time 0
        self.switches: dict[int, list[float]] = {}  # times at which the client flips state

    def _extend(self, client: int, until: float) -> list[float]:
        if client not in self.rngs:
            rng = self.rngs[client] = np.random.default_rng(derive(self.seed, client, tag="availability"))
            self.first[client] = bool(rng.random() < self.fractions[client])
            self.switches[client] = []
        rng, times, p = self.rngs[client], self.switches[client], self.fractions[client]
        online = self.first[client] == (len(times) % 2 == 0)  # the state after the last switch
        while not times or times[-1] <= until:
            mean = self.mean_online if online else self.mean_online * (1 - p) / p
            times.append((times[-1] if times else 0.0) + float(rng.exponential(mean)))
            online = not online
        return times

    def online(self, client: int, time: float) -> bool:
        if self.always or self.fractions[client] >= 1.0:
            return True
        times = self._extend(client, time)
        return self.first[client] == (bisect.bisect_right(times, time) % 2 == 0)

    def next_online(self, client: int, time: float) -> float:
        """The first instant >= `time` at which the client is online."""
        if self.online(client, time):
            return time
        times = self.switches[client]
        return times[bisect.bisect_right(times, time)]


def round_tokens(client_cfg, examples: list[dict]) -> float:
    """Tokens a local round processes: its optimizer steps × examples per step × the
    client's mean example length (padding is not work)."""
    if not examples:
        return 0.0
    per_step = client_cfg.per_device_train_batch_size * client_cfg.gradient_accumulation_steps
    mean_len = sum(len(e["input_ids"]) for e in examples) / len(examples)
    return default_steps(client_cfg, len(examples)) * per_step * mean_len


class Devices:
    """Each client's speed, links and online periods, and the simulated duration of its rounds."""

    def __init__(self, cfg, client_cfg, data: list[list[dict]], seed: int):
        n = len(data)
        self.speeds = client_speeds(cfg, n, seed)
        self.tokens = np.array([round_tokens(client_cfg, examples) for examples in data])
        self.tokens_per_second = cfg.tokens_per_second
        if cfg.profile == "equal":
            # every client-round takes the same time, whatever its data: "equally fast"
            self.tokens[:] = self.tokens.mean() if len(self.tokens) else 0.0
        rows = read_csv(cfg.path, n) if cfg.profile == "csv" else None
        column = lambda name, default, high=math.inf: (  # noqa: E731
            csv_column(cfg.path, rows, name, default, high) if rows else np.full(n, default, dtype=np.float64))
        self.downlink = column("downlink_bytes_per_s", cfg.downlink_bytes_per_s or math.inf)
        self.uplink = column("uplink_bytes_per_s", cfg.uplink_bytes_per_s or math.inf)
        self.availability = Availability(column("online_fraction", cfg.online_fraction, 1.0), cfg.mean_online_s, seed)

    def compute(self, client_id: int) -> float:
        """Simulated seconds of `client_id`'s local training in one round."""
        return float(self.tokens[client_id] / (self.speeds[client_id] * self.tokens_per_second))

    def duration(self, client_id: int, bytes_down: float = 0.0, bytes_up: float = 0.0) -> float:
        """Simulated seconds of one client-round: its download, its training, its upload."""
        return float(bytes_down / self.downlink[client_id] + self.compute(client_id) + bytes_up / self.uplink[client_id])

    def online(self, client_id: int, time: float) -> bool:
        return self.availability.online(client_id, time)

    def next_online(self, client_id: int, time: float) -> float:
        return self.availability.next_online(client_id, time)

    @property
    def always_online(self) -> bool:
        return self.availability.always

    def tiers(self, count: int) -> list[int]:
        """Tier of each client, 0 (slowest) to count − 1 (fastest), by speed rank in equal shares."""
        order = np.argsort(self.speeds, kind="stable")
        tiers = np.empty(len(order), dtype=np.int64)
        tiers[order] = np.arange(len(order)) * count // max(1, len(order))
        return tiers.tolist()

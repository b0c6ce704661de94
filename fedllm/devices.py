"""Simulated client devices: a speed per client, drawn once from the recipe seed (or read
from a CSV), turns a local round's tokens into simulated seconds. The simulated clock of
fedllm.asynchrony runs on these durations, never on wall time, so a run is a pure function
of its recipe. Speeds are relative (1 = `tokens_per_second`); tiers rank clients by speed."""
from __future__ import annotations

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


def csv_speeds(path: str | None, num_clients: int) -> np.ndarray:
    if not path or not Path(path).is_file():
        raise RecipeError(f"federation.devices.profile=csv needs a CSV file in federation.devices.path (got {path!r})")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "speed" not in rows[0]:
        raise RecipeError(f"{path} needs a header row with a 'speed' column and one row per client")
    if len(rows) < num_clients:
        raise RecipeError(f"{path} lists {len(rows)} client speeds; federation.num_clients is {num_clients}")
    try:
        speeds = np.array([float(r["speed"]) for r in rows[:num_clients]])
    except ValueError as err:
        raise RecipeError(f"{path}: a speed is not a number ({err})") from None
    if not (speeds > 0).all():
        raise RecipeError(f"{path}: every speed must be > 0")
    return speeds


def round_tokens(client_cfg, examples: list[dict]) -> float:
    """Tokens a local round processes: its optimizer steps × examples per step × the
    client's mean example length (padding is not work)."""
    if not examples:
        return 0.0
    per_step = client_cfg.per_device_train_batch_size * client_cfg.gradient_accumulation_steps
    mean_len = sum(len(e["input_ids"]) for e in examples) / len(examples)
    return default_steps(client_cfg, len(examples)) * per_step * mean_len


class Devices:
    """Each client's speed and the simulated duration of its local round."""

    def __init__(self, cfg, client_cfg, data: list[list[dict]], seed: int):
        self.speeds = client_speeds(cfg, len(data), seed)
        self.tokens = np.array([round_tokens(client_cfg, examples) for examples in data])
        self.tokens_per_second = cfg.tokens_per_second
        if cfg.profile == "equal":
            # every client-round takes the same time, whatever its data: "equally fast"
            self.tokens[:] = self.tokens.mean() if len(self.tokens) else 0.0

    def duration(self, client_id: int) -> float:
        """Simulated seconds of one local round of `client_id`."""
        return float(self.tokens[client_id] / (self.speeds[client_id] * self.tokens_per_second))

    def tiers(self, count: int) -> list[int]:
        """Tier of each client, 0 (slowest) to count − 1 (fastest), by speed rank in equal shares."""
        order = np.argsort(self.speeds, kind="stable")
        tiers = np.empty(len(order), dtype=np.int64)
        tiers[order] = np.arange(len(order)) * count // max(1, len(order))
        return tiers.tolist()

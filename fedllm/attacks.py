"""Simulated Byzantine clients, for robustness experiments (recipe section `byzantine:`).

An attack picks its clients once per run (`choose`), may poison their local data
(`poison_data`, e.g. label flipping) and may replace their messages each round
(`poison_updates`, on the server's full list of (client_id, message, weight), so that
omniscient attacks such as ALIE and IPM can use the honest messages)."""
from __future__ import annotations

import numpy as np


class Attack:
    def __init__(self, count: int):
        if count < 0:
            raise ValueError("byzantine.count must be ≥ 0")
        self.count = count

    def choose(self, num_clients: int, seed: int) -> set[int]:
        if self.count > num_clients:
            raise ValueError(f"byzantine.count={self.count} exceeds the {num_clients} clients")
        return set(np.random.default_rng([seed, 0xB1]).choice(num_clients, self.count, replace=False).tolist())

    def poison_data(self, examples: list[dict], seed: int) -> list[dict]:
        return examples

    def poison_updates(self, kept: list, byzantine: set[int], round: int) -> list:
        return kept

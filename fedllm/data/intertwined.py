"""The experimental setting of Wang & Gao, "Tackling the Unlimited Staleness in Federated
Learning with Intertwined Data and Device Heterogeneities" (§3, §6): data heterogeneity and
device heterogeneity are intertwined — some categories live only on the slow devices, so
what the global model learns of them arrives stale, or (sync) holds every round back.

The paper's correction is not implemented: its server inverts each stale update into an
estimate of the client's training data (gradient inversion) and retrains the current model
on that estimate. That is a data-reconstruction attack run by the server: it contradicts
fedllm's privacy features (DP noise would defeat it, or it would defeat the DP promise;
buffered aggregation exists so the server never sees one client's update alone), and for
an LLM it means optimizing token embeddings against a LoRA update, with no evidence that
the reconstruction is faithful enough to convert an update. Staleness is handled by the
FedAsync / FedBuff weights instead (fedllm.strategies.staleness)."""
from __future__ import annotations

import math

import numpy as np

from fedllm.data.partition import _as_lists, _check_sizes, _column
from fedllm.data.rows import Rows
from fedllm.registry import PARTITIONERS, RecipeError


@PARTITIONERS.register("intertwined")
class Intertwined:
    """Rows of `slow_categories` only on the last ⌈slow_fraction·N⌉ clients (federation.devices.slow_fraction makes them the slow ones); other rows iid over all clients."""

    def __init__(self, slow_categories: list[str], slow_fraction: float = 0.3, column: str = "category"):
        if not slow_categories or not 0 < slow_fraction < 1:
            raise RecipeError("data.partitioner intertwined needs slow_categories and 0 < slow_fraction < 1")
        self.slow_categories, self.slow_fraction, self.column = set(slow_categories), slow_fraction, column

    def partition(self, dataset: Rows, num_clients: int, seed: int) -> list[list[int]]:
        values = _column(dataset, self.column)
        _check_sizes(len(dataset), num_clients)
        missing = self.slow_categories - set(values)
        if missing:
            raise RecipeError(f"data.partitioner.slow_categories {sorted(missing)} are not values of '{self.column}'")
        slow = math.ceil(self.slow_fraction * num_clients)
        if slow >= num_clients:
            raise RecipeError(f"intertwined: slow_fraction={self.slow_fraction} leaves no fast client among {num_clients}")
        rng = np.random.default_rng(seed)
        held = np.array([v in self.slow_categories for v in values])
        common = np.array_split(rng.permutation(np.flatnonzero(~held)), num_clients)
        only_slow = np.array_split(rng.permutation(np.flatnonzero(held)), slow)
        parts = [np.concatenate([common[c], only_slow[c - (num_clients - slow)]]) if c >= num_clients - slow else common[c]
                 for c in range(num_clients)]
        return _as_lists(parts)

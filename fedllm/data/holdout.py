"""Held-out rows split off per client (`eval.per_client: true`): every client keeps its own
slice of its shard for evaluation, so its metrics are scored on data from its own
distribution. The pooled held-out set is the union of those slices."""
from __future__ import annotations

import numpy as np

from fedllm.registry import RecipeError
from fedllm.seeds import derive


def split_per_client(shards: list[list[int]], fraction: float, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """(train rows, held-out rows) per client: round(fraction · shard size) rows of each shard,
    at least one, drawn with the client's own seeded stream; both sorted."""
    if fraction <= 0:
        raise RecipeError("eval.per_client needs held-out rows: set data.eval_fraction > 0 (e.g. 0.1)")
    train, held_out = [], []
    for client, shard in enumerate(shards):
        n_eval = max(1, round(fraction * len(shard)))
        if n_eval >= len(shard):
            raise RecipeError(
                f"client {client} has {len(shard)} row(s): data.eval_fraction={fraction} leaves it none to train on; "
                "lower data.eval_fraction or federation.num_clients, or use more data"
            )
        order = np.random.default_rng(derive(seed, client, tag="client-eval-split")).permutation(len(shard))
        rows = np.asarray(shard)
        held_out.append(sorted(int(i) for i in rows[order[:n_eval]]))
        train.append(sorted(int(i) for i in rows[order[n_eval:]]))
    return train, held_out

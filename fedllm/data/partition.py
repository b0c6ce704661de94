"""Partitioners: how the training rows are dealt out to the clients.

Every partitioner has `partition(dataset, num_clients, seed) -> list[list[int]]`: row indices
per client, disjoint, covering every row, no client empty, the same for the same seed. The
dataset is a `Rows` or a `datasets.Dataset`: both answer len, column_names and select_columns.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from fedllm.data.rows import Rows
from fedllm.registry import PARTITIONERS, RecipeError

MAX_DRAWS = 200  # dirichlet resamples before it gives up on min_size


def _check_sizes(num_rows: int, num_clients: int, min_size: int = 1) -> None:
    if num_clients < 1:
        raise RecipeError(f"federation.num_clients must be at least 1 (got {num_clients})")
    if num_rows < num_clients * min_size:
        raise RecipeError(
            f"cannot give {num_clients} clients at least {min_size} row(s) each: the training split has "
            f"only {num_rows} rows. Lower federation.num_clients (or data.partitioner.min_size) or use more data."
        )


def _check_positive(name: str, value: float) -> None:
    if value <= 0:
        raise RecipeError(f"data.partitioner.{name} must be > 0 (got {value})")


def _column(dataset: Rows, column: str) -> list:
    if column not in dataset.column_names:
        raise RecipeError(
            f"the partitioner needs a '{column}' column, but the dataset has columns: "
            f"{', '.join(dataset.column_names)}. Set data.partitioner.column to one of them."
        )
    return dataset.select_columns([column]).to_dict()[column]  # one Arrow read, not a row loop


def _groups(values: list) -> tuple[list, list[np.ndarray]]:
    """Distinct values in sorted order (by text if they do not compare) and each one's rows."""
    rows: dict = {}
    for i, value in enumerate(values):
        rows.setdefault(value, []).append(i)
    try:
        keys = sorted(rows)
    except TypeError:
        keys = sorted(rows, key=str)
    return keys, [np.asarray(rows[k]) for k in keys]


def _as_lists(parts) -> list[list[int]]:
    return [sorted(int(i) for i in part) for part in parts]


def _split_by_proportions(rows: np.ndarray, proportions: np.ndarray) -> list[np.ndarray]:
    cuts = (np.cumsum(proportions)[:-1] * len(rows)).astype(int)
    return np.split(rows, cuts)


@PARTITIONERS.register("iid")
class IID:
    """Uniformly random, near-equal shares."""

    def partition(self, dataset: Rows, num_clients: int, seed: int) -> list[list[int]]:
        _check_sizes(len(dataset), num_clients)
        order = np.random.default_rng(seed).permutation(len(dataset))
        return _as_lists(np.array_split(order, num_clients))


@PARTITIONERS.register("dirichlet")
class Dirichlet:
    """Label skew: each value of `column` is spread over the clients with Dirichlet(alpha)
    proportions; smaller alpha, more skew."""

    def __init__(self, alpha: float = 0.5, column: str = "category", min_size: int = 1):
        _check_positive("alpha", alpha)
        _check_positive("min_size", min_size)
        self.alpha, self.column, self.min_size = alpha, column, min_size

    def _draw(self, groups: list[np.ndarray], num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
        pieces: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for rows in groups:
            shares = rng.dirichlet(np.full(num_clients, self.alpha))
            for client, piece in enumerate(_split_by_proportions(rng.permutation(rows), shares)):
                pieces[client].append(piece)
        return [np.concatenate(p) for p in pieces]

    def partition(self, dataset: Rows, num_clients: int, seed: int) -> list[list[int]]:
        values = _column(dataset, self.column)
        _check_sizes(len(dataset), num_clients, self.min_size)
        _, groups = _groups(values)
        rng = np.random.default_rng(seed)
        # Rejection sampling keeps the draw a true Dirichlet one; rebalancing rows by hand
        # would quietly weaken the skew the user asked for.
        for _ in range(MAX_DRAWS):
            parts = self._draw(groups, num_clients, rng)
            if min(len(p) for p in parts) >= self.min_size:
                return _as_lists(parts)
        raise RecipeError(
            f"dirichlet(alpha={self.alpha}) gave some client fewer than {self.min_size} row(s) in each of "
            f"{MAX_DRAWS} draws ({len(dataset)} rows, {len(groups)} values of '{self.column}', {num_clients} "
            "clients). Raise data.partitioner.alpha, or lower federation.num_clients or data.partitioner.min_size."
        )


@PARTITIONERS.register("by_column")
class ByColumn:
    """Natural split: one client per distinct value of `column`, in sorted order."""

    def __init__(self, column: str = "category"):
        self.column = column

    def partition(self, dataset: Rows, num_clients: int, seed: int) -> list[list[int]]:
        keys, groups = _groups(_column(dataset, self.column))
        if num_clients != len(keys):
            raise RecipeError(
                f"by_column makes one client per value of '{self.column}', and the training split has "
                f"{len(keys)} values ({', '.join(map(str, keys[:10]))}{', ...' if len(keys) > 10 else ''}); "
                f"set federation.num_clients={len(keys)} (it is {num_clients})."
            )
        return _as_lists(groups)


@PARTITIONERS.register("quantity_skew")
class QuantitySkew:
    """Client sizes drawn from Dirichlet(alpha) (smaller alpha, more unequal); rows iid."""

    def __init__(self, alpha: float = 0.5, min_size: int = 1):
        _check_positive("alpha", alpha)
        _check_positive("min_size", min_size)
        self.alpha, self.min_size = alpha, min_size

    def partition(self, dataset: Rows, num_clients: int, seed: int) -> list[list[int]]:
        _check_sizes(len(dataset), num_clients, self.min_size)
        rng = np.random.default_rng(seed)
        # min_size rows each up front, the rest by the Dirichlet shares: no resampling needed
        spare = len(dataset) - num_clients * self.min_size
        sizes = self.min_size + rng.multinomial(spare, rng.dirichlet(np.full(num_clients, self.alpha)))
        order = rng.permutation(len(dataset))
        return _as_lists(np.split(order, np.cumsum(sizes)[:-1]))


@PARTITIONERS.register("iid_contiguous")
class IIDContiguous:
    """Flower Datasets' IID split (FederatedDataset + IidPartitioner, as FlowerTune uses it): the
    rows shuffled once with `shuffle_seed` (FederatedDataset's default, 42, whatever the recipe
    seed; null: no shuffle), then cut into contiguous near-equal shards, the first
    len % num_clients one row longer (datasets.Dataset.shard(contiguous=True))."""

    def __init__(self, shuffle_seed: Optional[int] = 42):
        self.shuffle_seed = shuffle_seed

    def partition(self, dataset: Rows, num_clients: int, seed: int) -> list[list[int]]:
        _check_sizes(len(dataset), num_clients)
        n = len(dataset)
        # datasets' shuffle(seed) is default_rng(seed).permutation(n)
        order = np.arange(n) if self.shuffle_seed is None else np.random.default_rng(self.shuffle_seed).permutation(n)
        return _as_lists(np.array_split(order, num_clients))

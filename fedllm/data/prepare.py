"""From `data:` recipe section to tokenized client shards: load, check, hold out eval,
partition, tokenize once."""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

import datasets
import numpy as np

import fedllm.data.partition  # noqa: F401  registers the partitioners
from fedllm.data.formats import FORMATS, check_columns, to_spans
from fedllm.data.holdout import split_per_client
from fedllm.data.loading import load_rows, take_sample
from fedllm.data.report import SplitReport, spread
from fedllm.data.tokenize import Lengths, tokenize_with_lengths
from fedllm.recipe import DataConfig
from fedllm.registry import PARTITIONERS, RecipeError
from fedllm.seeds import derive

log = logging.getLogger("fedllm")


@dataclass
class PreparedData:
    """Tokenized examples (`{input_ids, labels}` dicts) per client, and the eval set."""

    clients: list[list[dict]]
    eval: list[dict]
    client_sizes: list[int]
    num_dropped: int  # examples with nothing to train on (an empty response, or one truncated away)
    # eval.per_client: each client's own held-out examples (`eval` is their union, in client
    # order) and the row indices they came from; None with one pooled held-out set
    client_eval: list[list[dict]] | None = None
    client_eval_rows: list[list[int]] | None = None
    reports: tuple[SplitReport, ...] = ()  # train, eval: what was kept and why the rest was dropped


def _hold_out(rows: datasets.Dataset, fraction: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    n_eval = max(1, round(fraction * len(rows))) if fraction > 0 else 0
    if n_eval >= len(rows):
        raise RecipeError(
            f"data.eval_fraction={fraction} of {len(rows)} rows leaves no training rows; lower it or use more data"
        )
    order = np.random.default_rng(derive(seed, tag="eval-split")).permutation(len(rows))
    return rows.select(np.sort(order[n_eval:]).tolist()), rows.select(np.sort(order[:n_eval]).tolist())


def _split_train_eval(cfg: DataConfig, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    rows = take_sample(load_rows(cfg.path, cfg.subset, cfg.split), cfg.max_samples, derive(seed, tag="data-sample"))
    check_columns(rows.column_names, cfg.format)
    if cfg.eval_path is None and cfg.eval_split is None:
        return _hold_out(rows, cfg.eval_fraction, seed)
    # a separate eval set: another file, or another split of the same dataset (its subset too)
    if cfg.eval_path is None or cfg.eval_path == cfg.path:
        eval_rows = load_rows(cfg.path, cfg.subset, cfg.eval_split or "train")
    else:
        eval_rows = load_rows(cfg.eval_path, None, cfg.eval_split or "train")
    check_columns(eval_rows.column_names, cfg.format)
    return rows, eval_rows


def _split_per_client(cfg: DataConfig, num_clients: int, seed: int):
    """Every row partitioned first, then a slice of each client's shard held out
    (fedllm.data.holdout): the training rows, their shards, the held-out rows in client
    order, and each client's held-out row indices."""
    if cfg.eval_path is not None or cfg.eval_split is not None:
        raise RecipeError("eval.per_client holds out a slice of each client's own shard, so it cannot use "
                          "data.eval_path / data.eval_split: remove them or set eval.per_client=false")
    rows = take_sample(load_rows(cfg.path, cfg.subset, cfg.split), cfg.max_samples, derive(seed, tag="data-sample"))
    check_columns(rows.column_names, cfg.format)
    shards = PARTITIONERS.build(cfg.partitioner, where="data.partitioner").partition(rows, num_clients, seed)
    kept, held_out = split_per_client(shards, cfg.eval_fraction, seed)
    order = sorted(i for shard in kept for i in shard)
    position = {row: i for i, row in enumerate(order)}
    train_shards = [[position[row] for row in shard] for shard in kept]
    return rows.select(order), train_shards, rows.select([i for s in held_out for i in s]), held_out


def _encode(rows: datasets.Dataset, cfg: DataConfig, tokenizer) -> tuple[list[dict | None], list[Lengths]]:
    if len(rows) == 0:
        return [], []
    spans = [to_spans(row, cfg.format, tokenizer) for row in rows.to_list()]
    special_tokens = not FORMATS[cfg.format].templated
    return tokenize_with_lengths(spans, tokenizer, cfg.max_length, add_special_tokens=special_tokens)


def _report(reports: list[SplitReport]) -> None:
    for report in reports:
        report.check()
        if int(os.environ.get("RANK", "0")) != 0:  # every rank prepares the same data: rank 0 tells
            continue
        log.info(report.summary())
        if (warning := report.warning()) is not None:
            log.warning(warning)


def _split(cfg: DataConfig, num_clients: int, seed: int, per_client_eval: bool = False):
    """(training rows, each client's shard of them, eval rows, each client's held-out row indices or None)."""
    if per_client_eval:
        return _split_per_client(cfg, num_clients, seed)
    train, eval_rows = _split_train_eval(cfg, seed)
    shards = PARTITIONERS.build(cfg.partitioner, where="data.partitioner").partition(train, num_clients, seed)
    return train, shards, eval_rows, None


def client_rows(cfg: DataConfig, num_clients: int, seed: int, per_client_eval: bool = False) -> list[datasets.Dataset]:
    """Each simulated client's raw training rows, in the order its shard holds them: what a
    party of a deployed federation would hold as its own local file to reproduce the simulation."""
    train, shards, _, _ = _split(cfg, num_clients, seed, per_client_eval)
    return [train.select([int(i) for i in shard]) for shard in shards]


def prepare_local_data(cfg: DataConfig, tokenizer, path: str) -> list[dict]:
    """One party's own training examples: every row of its local file, in the recipe's
    format and length (the recipe's `path`, eval split and partitioner are the server's)."""
    rows = load_rows(path)
    check_columns(rows.column_names, cfg.format)
    encoded, lengths = _encode(rows, cfg, tokenizer)
    _report([SplitReport("local", cfg.max_length, lengths)])
    examples = [e for e in encoded if e is not None]
    if not examples:
        raise RecipeError(f"{path} has no example left after truncation to data.max_length={cfg.max_length}")
    return examples


def prepare_data(cfg: DataConfig, tokenizer, num_clients: int, seed: int, per_client_eval: bool = False) -> PreparedData:
    """Loads `cfg.path`, holds out the eval set (before partitioning, so no client trains on
    it), deals the training rows out with `cfg.partitioner` and tokenizes them with
    completion-only labels. `per_client_eval`: partitions first and holds out a slice of
    each client's shard instead."""
    if not sys.stderr.isatty():  # a log file gets the report below, not a progress bar per Arrow conversion
        datasets.disable_progress_bars()
    train, shards, eval_rows, held_out = _split(cfg, num_clients, seed, per_client_eval)
    (encoded, lengths), (encoded_eval, eval_lengths) = _encode(train, cfg, tokenizer), _encode(eval_rows, cfg, tokenizer)
    reports = [SplitReport("train", cfg.max_length, lengths), SplitReport("eval", cfg.max_length, eval_lengths)]
    _report(reports)
    clients = [[encoded[i] for i in shard if encoded[i] is not None] for shard in shards]
    empty = [c for c, examples in enumerate(clients) if not examples]
    if empty:
        mine = [lengths[i] for i in shards[empty[0]]]
        raise RecipeError(
            f"client {empty[0]} has no example left after truncation to data.max_length={cfg.max_length}: its "
            f"{len(mine)} prompts take {spread([x.prompt for x in mine])} tokens; raise data.max_length (to "
            f"{SplitReport('train', cfg.max_length, mine).whole_length()} to keep 95% of them whole) or shorten the prompts"
        )
    num_dropped = sum(e is None for e in encoded) + sum(e is None for e in encoded_eval)
    return PreparedData(
        clients=clients,
        eval=[e for e in encoded_eval if e is not None],
        client_sizes=[len(c) for c in clients],
        num_dropped=num_dropped,
        client_eval=_per_client(encoded_eval, held_out),
        client_eval_rows=held_out,
        reports=tuple(reports),
    )


def _per_client(encoded_eval: list[dict | None], held_out: list[list[int]] | None) -> list[list[dict]] | None:
    if held_out is None:
        return None
    out, start = [], 0
    for shard in held_out:  # the held-out rows were encoded in client order
        out.append([e for e in encoded_eval[start : start + len(shard)] if e is not None])
        start += len(shard)
    return out

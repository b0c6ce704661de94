"""From `data:` recipe section to tokenized client shards: load, check, hold out eval,
partition, tokenize once, in chunks, into packed buffers (fedllm.data.packed)."""
from __future__ import annotations

import ctypes
import functools
import gc
import logging
import os
import sys
from dataclasses import dataclass

import numpy as np

import fedllm.data.partition  # noqa: F401  registers the partitioners
from fedllm.data.formats import FORMATS, check_columns, to_spans
from fedllm.data.holdout import split_per_client
from fedllm.data.loading import load_rows, take_sample
from fedllm.data.packed import Packer, PackedExamples
from fedllm.data.report import LengthTable, SplitReport, spread
from fedllm.data.rows import Rows
from fedllm.data.tokenize import tokenize_with_lengths
from fedllm.recipe import DataConfig
from fedllm.registry import PARTITIONERS, RecipeError
from fedllm.seeds import derive

log = logging.getLogger("fedllm")

# Rows tokenized at a time: the Python lists of one chunk (~36 bytes a token) are all that
# data preparation holds beside the packed buffers, whatever the size of the dataset.
CHUNK_ROWS = 1024


@dataclass
class PreparedData:
    """Tokenized examples (sequences of `{input_ids, labels}` dicts) per client, and the eval
    set. Each split is one packed buffer; a client's examples are a window of it."""

    clients: list[PackedExamples]
    eval: PackedExamples
    client_sizes: list[int]
    num_dropped: int  # examples with nothing to train on (an empty response, or one truncated away)
    # eval.per_client: each client's own held-out examples (`eval` is their union, in client
    # order) and the row indices they came from; None with one pooled held-out set
    client_eval: list[PackedExamples] | None = None
    client_eval_rows: list[list[int]] | None = None
    reports: tuple[SplitReport, ...] = ()  # train, eval: what was kept and why the rest was dropped


def _hold_out(rows: Rows, fraction: float, seed: int) -> tuple[Rows, Rows]:
    n_eval = max(1, round(fraction * len(rows))) if fraction > 0 else 0
    if n_eval >= len(rows):
        raise RecipeError(
            f"data.eval_fraction={fraction} of {len(rows)} rows leaves no training rows; lower it or use more data"
        )
    order = np.random.default_rng(derive(seed, tag="eval-split")).permutation(len(rows))
    return rows.select(np.sort(order[n_eval:]).tolist()), rows.select(np.sort(order[:n_eval]).tolist())


def _split_train_eval(cfg: DataConfig, seed: int) -> tuple[Rows, Rows]:
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


def _encode(rows: Rows, cfg: DataConfig, tokenizer) -> tuple[PackedExamples, np.ndarray, LengthTable]:
    """The kept rows' examples, packed in row order; each row's index among them (-1:
    dropped, nothing to train on); and each row's Lengths. Tokenized CHUNK_ROWS at a time."""
    packer, lengths = Packer(len(tokenizer)), LengthTable()
    position = np.full(len(rows), -1, dtype=np.int64)
    special_tokens = not FORMATS[cfg.format].templated
    for start in range(0, len(rows), CHUNK_ROWS):
        chunk = rows.select(range(start, min(start + CHUNK_ROWS, len(rows)))).to_list()
        spans = [to_spans(row, cfg.format, tokenizer) for row in chunk]
        encoded, chunk_lengths = tokenize_with_lengths(spans, tokenizer, cfg.max_length, add_special_tokens=special_tokens)
        for i, example in enumerate(encoded):
            if example is not None:
                position[start + i] = len(packer)
                packer.add(example)
        lengths.extend(chunk_lengths)
        del chunk, spans, encoded, chunk_lengths  # before the next chunk's are built
    return packer.finish(), position, lengths


def _windows(packed: PackedExamples, position: np.ndarray, sizes: list[int]) -> list[PackedExamples]:
    """Rows encoded group after group (`sizes` rows each): each group's kept examples, a
    window of `packed` (kept rows keep their order, so a group's examples are contiguous)."""
    kept_before = np.concatenate([[0], np.cumsum(position >= 0)])
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return [packed[int(kept_before[a]) : int(kept_before[b])] for a, b in zip(bounds[:-1], bounds[1:])]


def _return_freed_memory() -> None:
    """Hands the memory that preparation's temporaries used back to the OS. glibc keeps freed
    heap pages (the chunks' lists and strings, the tokenizer's buffers) mapped, and so
    resident, until `malloc_trim` returns every whole free page; Arrow's allocator keeps its
    own pool until asked. Both are no-ops where absent (not glibc; `datasets` never used)."""
    gc.collect()  # anything a reference cycle kept alive, first
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    if "pyarrow" in sys.modules:
        sys.modules["pyarrow"].default_memory_pool().release_unused()


def _only_new_garbage(prepare):
    """Runs `prepare` with every object alive before it frozen (gc.freeze): the gc.collect of
    _return_freed_memory then traverses only what preparation made, not the whole heap of
    torch's and transformers' modules (0.3 s of CPU with them imported, more with a model)."""

    @functools.wraps(prepare)
    def run(*args, **kwargs):
        if gc.get_freeze_count():  # someone else froze the heap: left as it is
            return prepare(*args, **kwargs)
        gc.freeze()
        try:
            return prepare(*args, **kwargs)
        finally:
            gc.unfreeze()

    return run


def _report(reports: list[SplitReport]) -> None:
    for report in reports:
        report.check()
    if int(os.environ.get("RANK", "0")) == 0:  # every rank prepares the same data: rank 0 tells
        log_reports(reports)


def log_reports(reports) -> None:
    for report in reports:
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


def client_rows(cfg: DataConfig, num_clients: int, seed: int, per_client_eval: bool = False
                ) -> tuple[list[Rows], list[Rows]]:
    """Each simulated client's raw training rows, in the order its shard holds them (what a party
    of a deployed federation would hold as its own file to reproduce the simulation), and its
    share of the held-out rows: its own slice under eval.per_client, else a contiguous
    1/num_clients of the pooled eval set (the parties' evals add up to the pooled one)."""
    train, shards, eval_rows, held_out = _split(cfg, num_clients, seed, per_client_eval)
    sizes = [len(h) for h in held_out] if held_out is not None else [len(a) for a in np.array_split(
        np.arange(len(eval_rows)), num_clients)]
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    return ([train.select([int(i) for i in shard]) for shard in shards],
            [eval_rows.select(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:])])


@_only_new_garbage
def prepare_local_data(cfg: DataConfig, tokenizer, path: str) -> PackedExamples:
    """One party's own training examples: every row of its local file, in the recipe's
    format and length (the recipe's `path`, eval split and partitioner are the server's)."""
    rows = load_rows(path)
    check_columns(rows.column_names, cfg.format)
    examples, _, lengths = _encode(rows, cfg, tokenizer)
    _report([SplitReport("local", cfg.max_length, lengths)])
    if not len(examples):
        raise RecipeError(f"{path} has no example left after truncation to data.max_length={cfg.max_length}")
    del rows
    _return_freed_memory()
    return examples


@_only_new_garbage
def prepare_data(cfg: DataConfig, tokenizer, num_clients: int, seed: int, per_client_eval: bool = False) -> PreparedData:
    """Loads `cfg.path`, holds out the eval set (before partitioning, so no client trains on
    it), deals the training rows out with `cfg.partitioner` and tokenizes them with
    completion-only labels. `per_client_eval`: partitions first and holds out a slice of
    each client's shard instead."""
    train, shards, eval_rows, held_out = _split(cfg, num_clients, seed, per_client_eval)
    # the training rows in client order: each client's examples are then one window of the buffer
    in_order = np.fromiter((i for shard in shards for i in shard), dtype=np.int64)
    packed, position, lengths = _encode(train.select(in_order), cfg, tokenizer)
    packed_eval, eval_position, eval_lengths = _encode(eval_rows, cfg, tokenizer)
    del train, eval_rows
    reports = [SplitReport("train", cfg.max_length, lengths), SplitReport("eval", cfg.max_length, eval_lengths)]
    _report(reports)
    clients = _windows(packed, position, [len(shard) for shard in shards])
    empty = [c for c, examples in enumerate(clients) if not len(examples)]
    if empty:
        first = sum(len(shard) for shard in shards[: empty[0]])
        mine = [lengths[first + i] for i in range(len(shards[empty[0]]))]
        raise RecipeError(
            f"client {empty[0]} has no example left after truncation to data.max_length={cfg.max_length}: its "
            f"{len(mine)} prompts take {spread([x.prompt for x in mine])} tokens; raise data.max_length (to "
            f"{SplitReport('train', cfg.max_length, mine).whole_length()} to keep 95% of them whole) or shorten the prompts"
        )
    _return_freed_memory()
    return PreparedData(
        clients=clients,
        eval=packed_eval,
        client_sizes=[len(c) for c in clients],
        num_dropped=int((position < 0).sum() + (eval_position < 0).sum()),
        # the held-out rows were encoded in client order
        client_eval=None if held_out is None else _windows(packed_eval, eval_position, [len(s) for s in held_out]),
        client_eval_rows=held_out,
        reports=tuple(reports),
    )

"""Rows from wherever they live: a dataset bundled with fedllm (`bundled:<name>`), a local
json/jsonl/csv/parquet file or folder, or a Hugging Face Hub dataset. `datasets` is imported
only for the last two (fedllm.data.rows says why)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedllm.data.rows import Rows
from fedllm.registry import RecipeError

if TYPE_CHECKING:
    import datasets

BUNDLED_DIR = Path(__file__).parent / "bundled"
BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def bundled_names() -> list[str]:
    return sorted(p.stem for p in BUNDLED_DIR.glob("*.jsonl"))


def _datasets():
    import datasets

    if not sys.stderr.isatty():  # a log file gets the data report, not a progress bar per Arrow conversion
        datasets.disable_progress_bars()
    return datasets


def _load_bundled(name: str, split: str) -> Rows:
    file = BUNDLED_DIR / f"{name}.jsonl"
    if not file.is_file():
        raise RecipeError(f"no bundled dataset 'bundled:{name}'; bundled datasets: {', '.join(bundled_names())}")
    if split != "train":
        raise RecipeError(
            f"bundled:{name} has one split, 'train' (got '{split}'); hold out evaluation data with data.eval_fraction"
        )
    # plain json: no Arrow cache on disk, no `datasets` import, and a run starts at once
    with file.open() as f:
        return Rows([json.loads(line) for line in f if line.strip()])


def _load_local(path: Path, split: str) -> datasets.Dataset:
    datasets = _datasets()
    if path.is_dir():
        # datasets infers the builder from the files and the splits from their names
        # (train.jsonl, test.jsonl, ...); files without a split name form 'train'
        return datasets.load_dataset(str(path), split=split)
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise RecipeError(f"data file '{path}' has an unsupported type; use one of: {', '.join(BUILDERS)}")
    if not path.is_file():
        raise RecipeError(f"data file '{path}' does not exist")
    return datasets.load_dataset(builder, data_files=str(path), split=split)


def load_rows(path: str, subset: str | None = None, split: str = "train") -> Rows | datasets.Dataset:
    """`bundled:<name>`, a local file or folder, or else a Hub dataset name (`subset` is its
    configuration name)."""
    if path.startswith("bundled:"):
        return _load_bundled(path.removeprefix("bundled:"), split)
    local = Path(path).expanduser()
    if local.exists() or local.suffix.lower() in BUILDERS:
        return _load_local(local, split)
    return _datasets().load_dataset(path, subset, split=split)


def take_sample(rows: Rows | datasets.Dataset, max_samples: int | None, seed: int | np.random.SeedSequence):
    """The first `max_samples` rows after a shuffle seeded by `seed` (all rows if None)."""
    if max_samples is None or max_samples >= len(rows):
        return rows
    order = np.random.default_rng(seed).permutation(len(rows))
    return rows.select(order[:max_samples].tolist())

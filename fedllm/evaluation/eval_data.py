"""The examples `fedllm eval` scores: the run's own held-out split, re-derived exactly as the
run derived it (same recipe, same seed), or any dataset in a supported format."""
from __future__ import annotations

import logging
from pathlib import Path

from fedllm.data import FORMATS, PreparedData, check_columns, load_rows, prepare_data, to_spans, tokenize_examples
from fedllm.recipe import Recipe
from fedllm.registry import RecipeError

log = logging.getLogger("fedllm")


def heldout(recipe: Recipe, tokenizer, run_dir: Path | None) -> PreparedData:
    """The run's clients and held-out examples; warns if the split no longer matches the run's
    record (the data on disk changed since the run)."""
    data = prepare_data(recipe.data, tokenizer, recipe.federation.num_clients, recipe.seed,
                        per_client_eval=recipe.eval.per_client)
    meta = _run_meta(run_dir)
    if meta.get("eval_examples") not in (None, len(data.eval)) or meta.get("client_sizes") not in (None, data.client_sizes):
        log.warning("the held-out split re-derived from %s differs from the one the run recorded in run_meta.json "
                    "(%s eval examples now, %s then): the data changed since the run", recipe.data.path,
                    len(data.eval), meta.get("eval_examples"))
    return data


def _run_meta(run_dir: Path | None) -> dict:
    import json

    path = run_dir / "run_meta.json" if run_dir is not None else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}


def encode_rows(rows, fmt: str, tokenizer, max_length: int, special_tokens: bool | None = None) -> list[dict]:
    """Rows in data format `fmt` as tokenized examples with completion-only labels (rows with
    nothing left to score after truncation are dropped)."""
    if len(rows) == 0:
        return []
    spans = [to_spans(row, fmt, tokenizer) for row in rows.to_list()]
    add = (not FORMATS[fmt].templated) if special_tokens is None else special_tokens
    return [e for e in tokenize_examples(spans, tokenizer, max_length, add_special_tokens=add) if e is not None]


def external(path: str, recipe: Recipe, tokenizer, fmt: str | None = None, split: str = "train",
             subset: str | None = None, max_samples: int | None = None) -> list[dict]:
    """Every row (the first `max_samples`) of a dataset in a supported format, tokenized as the run's."""
    fmt = fmt or recipe.data.format
    rows = load_rows(path, subset, split)
    try:
        check_columns(rows.column_names, fmt)
    except RecipeError as err:
        raise RecipeError(f"--data {path}: {err} (for fedllm eval: --format)") from None
    if max_samples is not None:
        rows = rows.select(range(min(max_samples, len(rows))))
    return encode_rows(rows, fmt, tokenizer, recipe.data.max_length)

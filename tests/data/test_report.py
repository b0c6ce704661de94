"""The data report: every row dropped or truncated at preparation is counted, with why, and a
split that loses more than a small share to data.max_length gets a warning with the fix."""
import json
import logging

import datasets
import pytest

from fedllm.data import prepare_data
from fedllm.data.report import SplitReport, percentile
from fedllm.data.tokenize import Lengths
from fedllm.models import byte_tokenizer
from fedllm.recipe import DataConfig
from fedllm.registry import RecipeError


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def alpaca_file(tmp_path, rows):
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def half_long_rows(n=40):
    # even rows: a 150-byte instruction (the Alpaca preamble adds ~140): past max_length=200;
    # odd rows: a 10-byte one; every response 20 bytes
    return [{"instruction": ("x" * 150 if i % 2 == 0 else f"short {i:04d}"), "input": "", "output": f"answer {i:013d}",
             "category": "a"} for i in range(n)]


def test_half_the_prompts_past_max_length_are_reported_and_warned_with_the_numbers(tmp_path, caplog):
    cfg = DataConfig(path=alpaca_file(tmp_path, half_long_rows()), format="alpaca", max_length=200, eval_fraction=0.0)
    with caplog.at_level(logging.INFO, logger="fedllm"):
        data = prepare_data(cfg, byte_tokenizer(), num_clients=2, seed=0)
    train = data.reports[0]
    assert (len(train.lengths), train.too_long, train.empty, train.kept) == (40, 20, 0, 20)
    assert data.num_dropped == 20 and sum(data.client_sizes) == 20
    # prompt: preamble (~140 bytes) + instruction; the long ones 150 bytes more than the short ones
    long_prompt = max(x.prompt for x in train.lengths)
    assert long_prompt - min(x.prompt for x in train.lengths) == 150 - 10 and long_prompt >= 200
    assert train.whole_length() == long_prompt + 21  # 20 response bytes + <eos>
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1
    assert "20 of 40 (50%) train rows are DROPPED (their prompt fills data.max_length=200)" in warning[0]
    assert f"data.max_length={long_prompt + 21} would keep 95% of them whole (raise it from 200" in warning[0]
    summary = next(r.getMessage() for r in caplog.records if "train split" in r.getMessage())
    assert "40 rows, 20 kept, 20 dropped (20 with a prompt of data.max_length=200 tokens or more), 0 with a truncated" in summary
    assert f"max {long_prompt}" in summary


def test_truncated_responses_are_counted_and_a_clean_split_is_not_warned(tmp_path, caplog):
    rows = [{"instruction": "q", "input": "", "output": "a" * (5 if i < 10 else 300)} for i in range(20)]
    cfg = DataConfig(path=alpaca_file(tmp_path, rows), format="alpaca", max_length=200, eval_fraction=0.0)
    data = prepare_data(cfg, byte_tokenizer(), num_clients=2, seed=0)
    assert (data.reports[0].truncated, data.reports[0].too_long, data.reports[0].kept) == (10, 0, 20)
    warning = data.reports[0].warning()
    assert "10 of 20 (50%) train rows keep only the start of their response" in warning and "DROPPED" not in warning
    clean = SplitReport("train", 200, [Lengths(50, 10, 10, False)] * 99 + [Lengths(50, 200, 150, False)])
    assert clean.truncated == 1 and clean.warning() is None  # 1% is within the small share


def test_all_empty_responses_are_an_error(tmp_path):
    rows = [{"instruction": f"q{i}", "input": "", "output": "  "} for i in range(20)]
    cfg = DataConfig(path=alpaca_file(tmp_path, rows), format="alpaca", max_length=200, eval_fraction=0.0)
    with pytest.raises(RecipeError, match="every one of the 20 train rows has an empty response"):
        prepare_data(cfg, byte_tokenizer(), num_clients=2, seed=0)


def test_a_split_with_every_prompt_too_long_is_an_error_with_the_length_to_use(tmp_path):
    rows = [{"instruction": "x" * 150, "input": "", "output": "yes"} for _ in range(20)]
    cfg = DataConfig(path=alpaca_file(tmp_path, rows), format="alpaca", max_length=200, eval_fraction=0.0)
    with pytest.raises(RecipeError, match=r"every one of the 20 train rows was dropped: their prompts take p50 \d+ .*"
                                          r"data.max_length is 200; raise it \(to \d+ to keep 95%"):
        prepare_data(cfg, byte_tokenizer(), num_clients=2, seed=0)


def test_some_empty_responses_are_dropped_and_counted(tmp_path):
    rows = [{"instruction": f"q{i}", "input": "", "output": "" if i < 5 else "yes"} for i in range(20)]
    cfg = DataConfig(path=alpaca_file(tmp_path, rows), format="alpaca", max_length=200, eval_fraction=0.0)
    data = prepare_data(cfg, byte_tokenizer(), num_clients=2, seed=0)
    assert (data.reports[0].empty, data.num_dropped, sum(data.client_sizes)) == (5, 5, 15)
    assert "5 of 20 (25%) train rows have an empty response" in data.reports[0].warning()


def test_by_column_client_left_empty_says_how_long_its_prompts_are(tmp_path):
    rows = [{**r, "category": "long" if i % 2 == 0 else "short"} for i, r in enumerate(half_long_rows())]
    cfg = DataConfig(path=alpaca_file(tmp_path, rows), format="alpaca", max_length=200, eval_fraction=0.0,
                     partitioner={"name": "by_column", "column": "category"})
    with pytest.raises(RecipeError) as err:
        prepare_data(cfg, byte_tokenizer(), num_clients=2, seed=0)
    text = str(err.value)
    assert "client 0 has no example left" in text and "its 20 prompts take p50 " in text and "data.max_length=200" in text


def test_percentile_is_the_smallest_value_covering_the_share():
    assert percentile(list(range(1, 101)), 0.95) == 95 and percentile([7], 0.5) == 7 and percentile([], 0.5) == 0

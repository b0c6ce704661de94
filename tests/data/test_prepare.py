import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import datasets
import pytest
import torch

from fedllm.data import collate, prepare_data
from fedllm.data.formats import to_spans
from fedllm.data.loading import load_rows, take_sample
from fedllm.models import byte_tokenizer
from fedllm.recipe import DataConfig
from fedllm.registry import RecipeError

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "fedllm" / "data" / "bundled" / "quickstart.jsonl"


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path, monkeypatch):
    # local files are converted to Arrow in the datasets cache; keep that out of ~/.cache
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def dolly_rows(n: int) -> list[dict]:
    return [
        {"instruction": f"Echo {i}.", "context": f"Note {i}.", "response": f"r{i}", "category": f"c{i % 4}"}
        for i in range(n)
    ]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def responses(tok, examples) -> list[str]:
    return [tok.decode([t for t in e["labels"] if t >= 0], skip_special_tokens=True) for e in examples]


def test_bundled_quickstart_is_small_varied_and_short():
    rows = [json.loads(line) for line in QUICKSTART.read_text().splitlines()]
    categories = Counter(r["category"] for r in rows)
    assert 1800 <= len(rows) <= 2200
    assert 6 <= len(categories) <= 8 and min(categories.values()) >= 200
    assert QUICKSTART.stat().st_size < 1.5e6
    assert set(rows[0]) == {"instruction", "context", "response", "category"}
    assert sum(len(r["response"]) < 60 for r in rows) / len(rows) > 0.95
    assert sum(len(r["instruction"]) + len(r["context"]) < 200 for r in rows) / len(rows) > 0.95


def test_quickstart_sequences_fit_in_256_bytes(tok):
    rows = [json.loads(line) for line in QUICKSTART.read_text().splitlines()]
    longest = max(sum(len(tok(text)["input_ids"]) for text, _ in to_spans(r, "dolly", tok)) + 1 for r in rows)
    assert longest <= 256


def test_generator_reproduces_the_shipped_file(tmp_path):
    out = tmp_path / "quickstart.jsonl"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_quickstart_data.py"), "--out", str(out)], check=True)
    assert out.read_bytes() == QUICKSTART.read_bytes()


def test_prepare_bundled_holds_out_eval_and_accounts_for_every_row(tok):
    data = prepare_data(DataConfig(), tok, num_clients=10, seed=0)
    assert len(data.clients) == 10 and data.client_sizes == [len(c) for c in data.clients]
    assert len(data.eval) == 200  # eval_fraction 0.1 of 2000
    assert sum(data.client_sizes) + len(data.eval) + data.num_dropped == 2000
    assert data.num_dropped == 0
    example = data.clients[0][0]
    assert set(example) == {"input_ids", "labels"} and len(example["input_ids"]) == len(example["labels"])


def test_prepare_is_deterministic_per_seed(tok):
    cfg = DataConfig(partitioner={"name": "dirichlet", "alpha": 0.5})
    first = prepare_data(cfg, tok, num_clients=5, seed=1)
    assert prepare_data(cfg, tok, num_clients=5, seed=1) == first
    other = prepare_data(cfg, tok, num_clients=5, seed=2)
    assert other.client_sizes != first.client_sizes and other.eval != first.eval


def test_eval_rows_never_reach_a_client(tmp_path, tok):
    cfg = DataConfig(path=write_jsonl(tmp_path / "d.jsonl", dolly_rows(100)), eval_fraction=0.2)
    data = prepare_data(cfg, tok, num_clients=4, seed=0)
    held_out = set(responses(tok, data.eval))
    trained = set(responses(tok, [e for c in data.clients for e in c]))
    assert len(held_out) == 20 and len(trained) == 80
    assert held_out | trained == {f"r{i}" for i in range(100)}


def test_eval_path_replaces_the_held_out_fraction(tmp_path, tok):
    cfg = DataConfig(
        path=write_jsonl(tmp_path / "train.jsonl", dolly_rows(40)),
        eval_path=write_jsonl(tmp_path / "eval.jsonl", dolly_rows(7)),
    )
    data = prepare_data(cfg, tok, num_clients=2, seed=0)
    assert sum(data.client_sizes) == 40
    assert sorted(responses(tok, data.eval)) == sorted(f"r{i}" for i in range(7))


def test_no_eval_fraction_means_no_eval(tok):
    data = prepare_data(DataConfig(eval_fraction=0.0), tok, num_clients=3, seed=0)
    assert data.eval == [] and sum(data.client_sizes) == 2000


def test_max_samples_is_a_seeded_sample_of_the_rows(tok):
    rows = load_rows("bundled:quickstart")
    picks = [take_sample(rows, 50, seed).to_dict()["response"] for seed in (0, 0, 1)]
    assert len(picks[0]) == 50 and picks[0] == picks[1] != picks[2]
    assert picks[0] != rows.to_dict()["response"][:50]  # shuffled first, not the file's head
    data = prepare_data(DataConfig(max_samples=50), tok, num_clients=2, seed=0)
    assert sum(data.client_sizes) + len(data.eval) == 50


def test_examples_whose_response_is_truncated_away_are_dropped_and_counted(tmp_path, tok):
    rows = dolly_rows(30)
    for row in rows[:6]:
        row["context"] = "x" * 100  # pushes the response past max_length
    cfg = DataConfig(path=write_jsonl(tmp_path / "d.jsonl", rows), max_length=96, eval_fraction=0.0)
    data = prepare_data(cfg, tok, num_clients=3, seed=0)
    assert data.num_dropped == 6 and sum(data.client_sizes) == 24


def test_every_local_file_type_and_a_folder_load_the_same_rows(tmp_path):
    rows = dolly_rows(5)
    frame = datasets.Dataset.from_list(rows)
    write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_parquet(tmp_path / "d.parquet")
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", rows)
    write_jsonl(folder / "test.jsonl", rows[:2])
    for source in ("d.jsonl", "d.json", "d.csv", "d.parquet", "folder"):
        assert load_rows(str(tmp_path / source)).to_list() == rows, source
    assert load_rows(str(folder), split="test").to_list() == rows[:2]


def test_other_names_go_to_the_hub_with_subset_and_split(monkeypatch):
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: calls.append((a, kw)) or "rows")
    assert load_rows("someone/some-dataset", "en", "validation") == "rows"
    assert calls == [(("someone/some-dataset", "en"), {"split": "validation"})]


@pytest.mark.parametrize(
    "path, split, message",
    [
        ("bundled:nope", "train", "no bundled dataset 'bundled:nope'; bundled datasets: quickstart"),
        ("bundled:quickstart", "test", "has one split, 'train'"),
        ("missing/data.jsonl", "train", "'missing/data.jsonl' does not exist"),
    ],
)
def test_loading_errors_say_what_is_wrong(path, split, message):
    with pytest.raises(RecipeError, match=message):
        load_rows(path, split=split)


def test_unsupported_local_file_type(tmp_path):
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(RecipeError, match=r"unsupported type; use one of: .json, .jsonl, .csv, .parquet"):
        load_rows(str(tmp_path / "d.txt"))


def test_prepare_checks_the_format_columns(tmp_path, tok):
    alpaca = [{"instruction": "Say hi.", "input": "", "output": "hi"}] * 10
    cfg = DataConfig(path=write_jsonl(tmp_path / "a.jsonl", alpaca))
    with pytest.raises(RecipeError, match=r"needs a 'response' column.*look like data.format=alpaca"):
        prepare_data(cfg, tok, num_clients=2, seed=0)
    data = prepare_data(cfg.model_copy(update={"format": "alpaca"}), tok, num_clients=2, seed=0)
    assert responses(tok, data.clients[0])[0] == "hi"


def test_chat_rows_from_a_local_file(tmp_path, tok):
    chats = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(10)
    ]
    cfg = DataConfig(path=write_jsonl(tmp_path / "c.jsonl", chats), format="chat", eval_fraction=0.0)
    data = prepare_data(cfg, tok, num_clients=2, seed=0)
    assert sorted(responses(tok, [e for c in data.clients for e in c])) == sorted(f"a{i}" for i in range(10))


def test_collate_right_pads_and_masks_the_padding():
    batch = collate(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_token_id=0
    )
    assert all(t.dtype == torch.long for t in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]

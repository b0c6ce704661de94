"""Tokenized examples are held packed (ids as uint16/int32, one bit per label, offsets) and
read back as exactly the `{input_ids, labels}` dicts the Python lists held."""
import json

import numpy as np
import pytest

from fedllm.data import prepare_data
from fedllm.data.loading import load_rows
from fedllm.data.packed import Packer, PackedExamples, id_dtype
from fedllm.data.report import LengthTable
from fedllm.data.rows import Rows
from fedllm.data.tokenize import Lengths
from fedllm.models import byte_tokenizer
from fedllm.recipe import DataConfig


def examples(n: int, vocab: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(0, vocab, rng.integers(1, 40)).tolist()
        out.append({"input_ids": ids, "labels": [t if rng.random() < 0.6 else -100 for t in ids]})
    return out


def packed(items: list[dict], vocab: int) -> PackedExamples:
    packer = Packer(vocab)
    for e in items:
        packer.add(e)
    return packer.finish()


@pytest.mark.parametrize("vocab, dtype", [(259, np.uint16), (65_536, np.uint16), (128_256, np.int32)])
def test_packed_examples_read_back_as_the_lists_and_take_two_or_four_bytes_a_token(vocab, dtype):
    items = examples(60, vocab)
    p = packed(items, vocab)
    assert id_dtype(vocab) == dtype and p.ids.dtype == dtype
    assert list(p) == items and p == items and p[-1] == items[-1] and p[::3] == items[::3]
    assert p[7:31] == items[7:31] and p[7:31][2:5] == items[9:12] and p[40:999] == items[40:]
    tokens = sum(len(e["input_ids"]) for e in items)
    assert p.num_tokens == tokens and p.nbytes == tokens * np.dtype(dtype).itemsize + (tokens + 7) // 8 + 61 * 8
    picked = [5, 0, 59, 5, 33]
    assert p.take(picked) == [items[i] for i in picked] and p[10:50].take([0, 39]) == [items[10], items[49]]
    with pytest.raises(IndexError):
        p[60]


def test_an_id_beyond_the_dtype_is_an_error_not_a_wrapped_token():
    with pytest.raises(OverflowError):
        packed([{"input_ids": [70_000], "labels": [70_000]}], 300)


def test_length_table_holds_the_lengths():
    rows = [Lengths(5, 7, 7, False), Lengths(300, 0, 0, True), Lengths(2**20, 9, 3, False)]
    table = LengthTable(rows)
    assert list(table) == rows and table[1] == rows[1] and table[-1] == rows[-1] and len(table) == 3 and table == rows


def test_each_client_is_a_window_of_one_buffer_in_its_shards_order():
    data = prepare_data(DataConfig(max_samples=300, partitioner={"name": "dirichlet", "alpha": 0.5}),
                        byte_tokenizer(), 5, seed=0)
    assert len({id(c.ids) for c in data.clients}) == 1
    assert [c.offsets[0] for c in data.clients[1:]] == [c.offsets[-1] for c in data.clients[:-1]]
    assert data.clients[0].ids.dtype == np.uint16 and sum(data.client_sizes) + len(data.eval) == 300


def test_bundled_rows_answer_as_a_dataset_does(tmp_path):
    rows = load_rows("bundled:quickstart")
    assert isinstance(rows, Rows) and len(rows) == 2000
    assert rows.column_names == ["instruction", "context", "response", "category"]
    picked = rows.select(range(3, 6))
    assert picked.to_list() == rows.to_list()[3:6] and picked.select_columns(["response"]).to_dict() == {
        "response": [r["response"] for r in rows.to_list()[3:6]]}
    picked.to_json(tmp_path / "p.jsonl")
    assert [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()] == picked.to_list()

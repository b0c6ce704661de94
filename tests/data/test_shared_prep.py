"""Data prepared once per machine (fedllm.data.shared): the leader's file maps back to exactly
the data every rank would have prepared, a stale or damaged copy is rebuilt, and the other
ranks of the machine never tokenize."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import fedllm.data.shared as shared
from fedllm.data import prepare_data
from fedllm.data.shared import META, TENSORS, digest, read_prepared, write_prepared
from fedllm.models import byte_tokenizer
from fedllm.recipe import DataConfig
from fedllm.registry import RecipeError

CFG = DataConfig(max_samples=200, max_length=96, eval_fraction=0.2)


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def file_behind(array: np.ndarray) -> str | None:
    """The file mapped at the array's memory (Linux's /proc/self/maps), or None for heap memory."""
    address = array.ctypes.data
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, *rest = line.split(maxsplit=5)
        low, high = (int(x, 16) for x in span.split("-"))
        if low <= address < high:
            return rest[4] if len(rest) == 5 and rest[4].startswith("/") else None
    return None


def same_data(a, b) -> None:
    assert a.client_sizes == b.client_sizes and a.num_dropped == b.num_dropped
    for x, y in zip([*a.clients, a.eval, *(a.client_eval or [])], [*b.clients, b.eval, *(b.client_eval or [])]):
        assert list(x) == list(y) and x.ids.dtype == y.ids.dtype  # every example, token for token
    assert (a.client_eval is None) == (b.client_eval is None) and a.client_eval_rows == b.client_eval_rows
    assert [(r.split, r.max_length, list(r.lengths)) for r in a.reports] == [(r.split, r.max_length, list(r.lengths)) for r in b.reports]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the memory map from Linux's /proc")
@pytest.mark.parametrize("per_client_eval", [False, True])
def test_the_written_data_maps_back_identical_and_zero_copy(tmp_path, tok, per_client_eval):
    data = prepare_data(CFG, tok, 5, 0, per_client_eval=per_client_eval)
    key = digest(CFG, tok, 5, 0, per_client_eval)
    write_prepared(tmp_path, data, key)
    mapped, why = read_prepared(tmp_path, key, verify=True)
    assert why == ""
    same_data(mapped, data)
    ids = mapped.clients[3].ids
    assert file_behind(ids) == str(tmp_path / TENSORS) and not ids.flags.writeable  # the page cache's copy, not the heap's
    assert all(c.ids is ids for c in mapped.clients)  # one buffer, each client a window of it
    assert sum(c.num_tokens for c in mapped.clients) == len(ids)


def test_the_digest_names_everything_the_tokens_depend_on(tmp_path, tok):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"instruction": f"q{i}", "context": "", "response": f"a{i}"}) + "\n" for i in range(40)))
    cfg = DataConfig(path=str(rows), max_length=96)
    base = digest(cfg, tok, 5, 0, False)
    assert digest(cfg, tok, 5, 0, False) == base
    other_tok = byte_tokenizer()
    other_tok.add_special_tokens({"additional_special_tokens": ["<extra>"]})
    changed = [digest(cfg, tok, 5, 1, False), digest(cfg, tok, 4, 0, False), digest(cfg, tok, 5, 0, True),
               digest(cfg.model_copy(update={"max_length": 97}), tok, 5, 0, False), digest(cfg, other_tok, 5, 0, False)]
    rows.write_text(rows.read_text() + json.dumps({"instruction": "q", "context": "", "response": "a"}) + "\n")
    changed.append(digest(cfg, tok, 5, 0, False))  # the data file was edited
    assert len({base, *changed}) == 1 + len(changed)


def test_a_stale_or_damaged_copy_does_not_read_back(tmp_path, tok):
    data = prepare_data(CFG, tok, 5, 0)
    key = digest(CFG, tok, 5, 0, False)
    write_prepared(tmp_path, data, key)
    assert read_prepared(tmp_path, "another", verify=False)[1].startswith("it was prepared for another")
    tensors = tmp_path / TENSORS
    raw = bytearray(tensors.read_bytes())
    raw[-5] ^= 1  # one flipped bit in a token id
    tensors.write_bytes(bytes(raw))
    assert read_prepared(tmp_path, key, verify=True) == (None, f"{TENSORS} does not match its checksum")
    tensors.write_bytes(bytes(raw[:-100]))  # cut short
    assert "cut short" in read_prepared(tmp_path, key, verify=False)[1]
    (tmp_path / META).write_text("{")
    assert "does not read back" in read_prepared(tmp_path, key, verify=False)[1]
    assert read_prepared(tmp_path / "none", key, verify=False) == (None, "there is none")


def test_the_leader_rebuilds_a_damaged_copy_and_the_others_map_it_without_tokenizing(tmp_path, tok, monkeypatch, caplog):
    fresh = prepare_data(CFG, tok, 5, 0)
    key = digest(CFG, tok, 5, 0, False)
    write_prepared(tmp_path, fresh, key)
    (tmp_path / TENSORS).write_bytes((tmp_path / TENSORS).read_bytes()[:-1] + b"\xff")  # an earlier launch's, damaged
    (tmp_path / "ready-7").write_text("ok")  # and its signal
    led = shared._lead(CFG, tok, 5, 0, False, tmp_path, 8, key)
    assert "cannot be used (prepared.safetensors does not match its checksum)" in caplog.text
    assert not (tmp_path / "ready-7").exists() and (tmp_path / "ready-8").read_text() == "ok"

    def refuse(*args, **kwargs):
        raise AssertionError("a rank other than the leader tokenized")

    monkeypatch.setattr(shared, "prepare_data", refuse)
    followed = shared._follow(CFG, tok, 5, 0, False, tmp_path, 8, key)
    same_data(led, fresh)
    same_data(followed, fresh)
    assert followed.clients[0].ids.ctypes.data != led.clients[0].ids.ctypes.data  # each maps the file itself
    again = shared._lead(CFG, tok, 5, 0, False, tmp_path, 9, key)  # a later launch (a resume): the copy is reused
    same_data(again, fresh)


def test_when_the_leader_fails_the_others_fail_with_the_same_error(tmp_path, tok):
    cfg = DataConfig(max_samples=200, max_length=96, eval_fraction=0.999)  # leaves no training row
    key = digest(cfg, tok, 5, 0, False)
    with pytest.raises(RecipeError, match="leaves no training rows") as leader:
        shared._lead(cfg, tok, 5, 0, False, tmp_path, 3, key)
    assert (tmp_path / "ready-3").read_text() == "failed"
    with pytest.raises(RecipeError) as follower:
        shared._follow(cfg, tok, 5, 0, False, tmp_path, 3, key)
    assert str(follower.value) == str(leader.value)


def test_a_leader_that_cannot_write_leaves_each_rank_its_own_data(tmp_path, tok, monkeypatch):
    key = digest(CFG, tok, 5, 0, False)
    monkeypatch.setattr(shared, "write_prepared", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    led = shared._lead(CFG, tok, 5, 0, False, tmp_path, 4, key)
    assert (tmp_path / "ready-4").read_text() == "own"
    same_data(shared._follow(CFG, tok, 5, 0, False, tmp_path, 4, key), led)


@pytest.mark.slow
def test_two_ranks_share_one_preparation_and_end_where_one_rank_ends(recipe_file, tmp_path):
    from fedllm.engine import run_recipe
    from tests.engine.test_distributed import launch_two_processes

    path = recipe_file(federation={"rounds": 2, "num_clients": 5, "clients_per_round": 3})
    one = load_file(str(run_recipe(str(path)) / "final" / "adapter_model.safetensors"))
    assert not (tmp_path / "runs" / "run" / "data").exists()  # one process: nothing to share
    launch_two_processes(path, "two")
    two_dir = tmp_path / "runs" / "two"
    two = load_file(str(two_dir / "final" / "adapter_model.safetensors"))
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-7)
    signals = list((two_dir / "data").glob("ready-*"))
    assert len(signals) == 1 and signals[0].read_text() == "ok"
    meta = json.loads((two_dir / "data" / META).read_text())
    rows = json.loads((two_dir / "run_meta.json").read_text())["client_sizes"]
    assert np.diff(load_file(str(two_dir / "data" / TENSORS))["train.bounds"].numpy()).tolist() == rows
    assert meta["format"] == shared.FORMAT and len(meta["digest"]) == 64

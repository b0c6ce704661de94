"""Client store and checkpoints: spill past a budget, exact round trips, atomic and incremental writes."""
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fedllm.state as state_module
from fedllm.state import (
    ClientStore, checkpoint_dirs, file_digest as real_digest, read_checkpoint, read_manifest, verify_checkpoint,
    write_checkpoint,
)
from fedllm.wire import Message, deserialize, serialize


def state(value, n=256):
    return {"a": torch.full((n,), float(value)), "b.step": torch.tensor(value)}


def test_the_store_spills_least_recently_used_clients_past_its_budget(tmp_path):
    store = ClientStore(tmp_path / "spill", budget_bytes=3 * 256 * 4 + 100)
    for c in range(10):
        store.put(c, state(c))
    assert len(store) == 10 and store.ids() == list(range(10))
    assert len(store._memory) <= 3
    assert len(list((tmp_path / "spill").glob("*.safetensors"))) == 10 - len(store._memory)
    for c in range(10):
        got = store.get(c)
        assert torch.equal(got["a"], state(c)["a"]) and int(got["b.step"]) == c


def test_a_budget_of_zero_makes_the_directory_the_store_shared_by_processes(tmp_path):
    writer, reader = ClientStore(tmp_path / "s", 0), ClientStore(tmp_path / "s", 0)
    writer.put(7, state(7))
    assert 7 in reader and torch.equal(reader.get(7)["a"], state(7)["a"])


def test_checkpoints_round_trip_and_keep_only_the_last_ones(tmp_path):
    store = ClientStore(tmp_path / "spill", budget_bytes=1 << 20)
    store.put(3, state(3))
    for r in (1, 2, 3):
        write_checkpoint(tmp_path, r, {"global": state(r)}, store, {"round": r}, keep_last=2)
    done = checkpoint_dirs(tmp_path)
    assert [p.name for p in done] == ["round_2", "round_3"]
    parts, meta = read_checkpoint(done[-1])
    assert meta["round"] == 3 and torch.equal(parts["global"]["a"], state(3)["a"])
    restored = ClientStore(tmp_path / "other", budget_bytes=1 << 20)
    restored.restore(done[-1] / "clients")
    assert restored.ids() == [3] and torch.equal(restored.get(3)["a"], state(3)["a"])


def test_an_interrupted_checkpoint_write_is_ignored(tmp_path):
    store = ClientStore(tmp_path / "spill", budget_bytes=0)
    write_checkpoint(tmp_path, 1, {"global": state(1)}, store, {"round": 1}, keep_last=0)
    (tmp_path / "checkpoints" / ".tmp_round_2").mkdir()  # what a kill during the write leaves
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["round_1"]


def test_messages_round_trip_tensors_and_metadata_through_bytes():
    msg = Message({"x": torch.arange(6, dtype=torch.float32).reshape(2, 3), "i": torch.tensor([1, 2])}, {"seeds": [1, 2]})
    wire = serialize(msg)
    back = deserialize(wire)
    assert isinstance(wire, bytes) and back.meta == {"seeds": [1, 2]}
    assert torch.equal(back.tensors["x"], msg.tensors["x"]) and torch.equal(back.tensors["i"], msg.tensors["i"])


def client_state(value, n=1024):
    return {"exp_avg": torch.full((n,), float(value)), "step": torch.tensor(value)}


def test_a_checkpoint_writes_only_the_clients_that_changed_since_the_last_one(tmp_path):
    store = ClientStore(tmp_path / "spill", budget_bytes=1 << 30)  # all in memory
    for c in range(100):
        store.put(c, client_state(c))
    first = write_checkpoint(tmp_path, 1, {"global": state(1)}, store, {"round": 1}, keep_last=0)
    one_client = (first.path / "clients" / "client_0.safetensors").stat().st_size
    assert first.bytes_written >= 100 * one_client and first.files_linked == 0
    for c in (3, 50, 99):
        store.put(c, client_state(c + 1000))
    second = write_checkpoint(tmp_path, 2, {"global": state(2)}, store, {"round": 2}, keep_last=0)
    assert second.files_linked == 97
    assert 3 * one_client <= second.bytes_written < 3 * one_client + 20_000  # + global, meta, manifest
    assert verify_checkpoint(second.path) is None
    restored = ClientStore(tmp_path / "other", budget_bytes=1 << 30)
    restored.restore(second.path / "clients")
    for c in range(100):
        expected = c + 1000 if c in (3, 50, 99) else c
        assert torch.equal(restored.get(c)["exp_avg"], client_state(expected)["exp_avg"])
    old = load_file(str(first.path / "clients" / "client_3.safetensors"))
    assert torch.equal(old["exp_avg"], client_state(3)["exp_avg"])  # the older checkpoint kept its own version


def test_spilled_clients_enter_a_checkpoint_as_links_and_are_hashed_once(tmp_path, monkeypatch):
    store = ClientStore(tmp_path / "spill", budget_bytes=0)  # the disk is the store (as with several ranks)
    for c in range(20):
        store.put(c, client_state(c))
    hashed = []
    monkeypatch.setattr(state_module, "file_digest", lambda p: hashed.append(p) or real_digest(p))
    cost = write_checkpoint(tmp_path, 1, {"global": state(1)}, store, {"round": 1}, keep_last=0)
    assert cost.files_linked == 20 and hashed == []  # the store knew every digest from its own writes
    spilled = os.stat(tmp_path / "spill" / "client_7.safetensors")
    assert os.stat(cost.path / "clients" / "client_7.safetensors").st_ino == spilled.st_ino
    other_rank = ClientStore(tmp_path / "spill", budget_bytes=0)
    other_rank.put(7, client_state(77))  # written by another process: rank 0 has to hash it, and only it
    cost = write_checkpoint(tmp_path, 2, {"global": state(2)}, store, {"round": 2}, keep_last=1)
    assert [p.name for p in hashed] == ["client_7.safetensors"]
    assert verify_checkpoint(cost.path) is None and checkpoint_dirs(tmp_path) == [cost.path]
    back = load_file(str(cost.path / "clients" / "client_7.safetensors"))
    assert torch.equal(back["exp_avg"], client_state(77)["exp_avg"])


def test_a_resumed_store_links_its_unchanged_clients_into_the_next_checkpoint(tmp_path):
    store = ClientStore(tmp_path / "spill", budget_bytes=1 << 30)
    for c in range(50):
        store.put(c, client_state(c))
    first = write_checkpoint(tmp_path, 1, {"global": state(1)}, store, {"round": 1}, keep_last=0)
    resumed = ClientStore(tmp_path / "spill2", budget_bytes=1 << 30)
    resumed.restore(first.path / "clients", read_manifest(first.path, under="clients/"))
    resumed.put(4, client_state(44))
    second = write_checkpoint(tmp_path, 2, {"global": state(2)}, resumed, {"round": 2}, keep_last=0)
    assert second.files_linked == 49 and verify_checkpoint(second.path) is None
    assert torch.equal(load_file(str(second.path / "clients" / "client_4.safetensors"))["exp_avg"],
                       client_state(44)["exp_avg"])


def test_a_full_copy_is_still_available_as_the_reference(tmp_path):
    store = ClientStore(tmp_path / "spill", budget_bytes=1 << 30)
    for c in range(10):
        store.put(c, client_state(c))
    write_checkpoint(tmp_path, 1, {"global": state(1)}, store, {"round": 1}, keep_last=0)
    full = write_checkpoint(tmp_path, 2, {"global": state(2)}, store, {"round": 2}, keep_last=0, incremental=False)
    assert full.files_linked == 0 and full.bytes_written > 10 * 4096


def test_a_kill_while_deleting_an_old_checkpoint_never_leaves_a_partial_one(tmp_path, monkeypatch):
    store = ClientStore(tmp_path / "spill", budget_bytes=0)
    store.put(1, client_state(1))
    write_checkpoint(tmp_path, 1, {"global": state(1)}, store, {"round": 1}, keep_last=1)
    real_rmtree = shutil.rmtree

    def killed_mid_delete(path, *args, **kwargs):
        if Path(path).name.startswith(".trash_") and Path(path).exists():
            next(Path(path).rglob("*.safetensors")).unlink()  # part of it is gone when the kill lands
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(state_module.shutil, "rmtree", killed_mid_delete)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path, 2, {"global": state(2)}, store, {"round": 2}, keep_last=1)
    monkeypatch.undo()
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["round_2"]  # the half-deleted one is out of sight
    write_checkpoint(tmp_path, 3, {"global": state(3)}, store, {"round": 3}, keep_last=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["round_3"]  # and cleaned up later


def test_a_symbolic_link_inside_a_checkpoint_is_damage(tmp_path):
    store = ClientStore(tmp_path / "spill", budget_bytes=0)
    cost = write_checkpoint(tmp_path, 1, {"global": state(1)}, store, {"round": 1}, keep_last=0)
    (cost.path / "global.safetensors").unlink()
    (cost.path / "global.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    assert "symbolic link" in verify_checkpoint(cost.path)


def test_a_file_the_manifest_does_not_list_is_damage(tmp_path):
    store = ClientStore(tmp_path / "spill", budget_bytes=0)
    store.put(1, client_state(1))
    cost = write_checkpoint(tmp_path, 1, {"global": state(1)}, store, {"round": 1}, keep_last=0)
    shutil.copyfile(cost.path / "clients" / "client_1.safetensors", cost.path / "clients" / "client_9.safetensors")
    assert "not in its manifest" in verify_checkpoint(cost.path)

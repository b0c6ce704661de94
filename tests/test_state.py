"""Client store and checkpoints: spill past a budget, exact round trips, atomic writes."""
import torch

from fedllm.state import ClientStore, checkpoint_dirs, read_checkpoint, write_checkpoint
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

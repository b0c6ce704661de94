"""eval.per_client's split: each client's held-out rows come from its own shard, never train."""
import pytest

from fedllm.data.holdout import split_per_client
from fedllm.registry import RecipeError


def test_each_client_holds_out_a_seeded_slice_of_its_own_shard():
    shards = [list(range(0, 50)), list(range(50, 60)), list(range(60, 163))]
    train, held_out = split_per_client(shards, 0.1, seed=3)
    assert [len(h) for h in held_out] == [5, 1, 10]
    for shard, kept, out in zip(shards, train, held_out):
        assert sorted(kept + out) == shard and not set(kept) & set(out)
    assert split_per_client(shards, 0.1, seed=3) == (train, held_out)
    assert split_per_client(shards, 0.1, seed=4)[1] != held_out


def test_a_shard_too_small_to_hold_out_from_names_the_client():
    with pytest.raises(RecipeError, match="client 1 has 1 row"):
        split_per_client([[0, 1, 2], [3]], 0.2, seed=0)
    with pytest.raises(RecipeError, match="data.eval_fraction > 0"):
        split_per_client([[0, 1, 2]], 0.0, seed=0)

"""A round's clients split over the client groups so that the groups' work is even."""
import numpy as np
import pytest

from fedllm.balance import split_by_cost
from fedllm.data import collate
from fedllm.training import example_lengths, micro_batches, padded_tokens
from tests.data.test_packed import examples, packed


def test_each_group_gets_floor_or_ceil_of_the_clients_and_every_client_once():
    clients = list(range(3, 14))  # 11 clients over 3 groups: 4, 4, 3
    costs = [float((7 * c) % 10 + 1) for c in clients]
    parts = split_by_cost(clients, costs, 3)
    assert sorted(len(p) for p in parts) == [3, 4, 4]
    assert sorted(c for p in parts for c in p) == clients
    assert all(p == sorted(p) for p in parts)


def test_the_split_evens_costs_that_a_round_robin_split_leaves_uneven():
    clients = [0, 1, 2, 3, 4, 5]
    costs = [9.0, 1.0, 8.0, 2.0, 7.0, 3.0]  # round robin: 24 vs 6
    parts = split_by_cost(clients, costs, 2)
    loads = [sum(costs[c] for c in p) for p in parts]
    assert parts == [[0, 3, 5], [1, 2, 4]]  # 9+2+3=14, 1+8+7=16: the count cap keeps 3 each
    assert loads == [14.0, 16.0]
    assert max(loads) < max(sum(costs[0::2]), sum(costs[1::2]))


def test_equal_costs_split_by_id_and_one_group_takes_all():
    assert split_by_cost([5, 6, 7, 8], [1.0] * 4, 2) == [[5, 7], [6, 8]]
    assert split_by_cost([2, 9], [3.0, 4.0], 1) == [[2, 9]]
    assert split_by_cost([], [], 2) == [[], []]
    with pytest.raises(ValueError, match="3 clients but 2 costs"):
        split_by_cost([1, 2, 3], [1.0, 2.0], 2)


@pytest.mark.parametrize("batch_size, count", [(4, 5), (3, 11), (8, 2)])
def test_planned_tokens_are_the_padded_tokens_of_the_batches_the_loop_draws(batch_size, count):
    items = examples(10, vocab=300, seed=1)
    client = packed(items, 300)
    assert example_lengths(client).tolist() == [len(e["input_ids"]) for e in items]
    drawn = micro_batches(client, batch_size, count, np.random.default_rng(42))
    seen = sum(collate(batch, pad_token_id=0)["input_ids"].numel() for batch in drawn)
    assert padded_tokens(example_lengths(client), batch_size, count, seed=42) == seen
    assert padded_tokens(example_lengths(items), batch_size, count, seed=42) == seen

"""iid_contiguous deals out exactly the shards FlowerTune's clients get: FederatedDataset's
shuffle(seed=42) followed by IidPartitioner's contiguous shard (both run here through the
`datasets` calls flwr-datasets makes, on a synthetic dataset)."""
import datasets
import pytest

from fedllm.data.partition import IIDContiguous
from fedllm.recipe import recipe_from_dict


@pytest.mark.parametrize("rows,clients", [(103, 20), (40, 7), (20, 20)])
def test_the_shards_equal_flower_datasets_iid_partitioner(rows, clients):
    data = datasets.Dataset.from_dict({"row": list(range(rows))})
    shuffled = data.shuffle(seed=42)  # FederatedDataset(shuffle=True, seed=42), its defaults
    flower = [sorted(shuffled.shard(num_shards=clients, index=i, contiguous=True)["row"]) for i in range(clients)]
    assert IIDContiguous().partition(data, clients, seed=0) == flower
    assert IIDContiguous().partition(data, clients, seed=5) == flower  # the recipe seed plays no part


def test_without_a_shuffle_the_shards_are_contiguous_runs():
    data = datasets.Dataset.from_dict({"row": list(range(10))})
    assert IIDContiguous(shuffle_seed=None).partition(data, 3, seed=0) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_the_recipe_names_it_with_its_option():
    recipe = recipe_from_dict({"data": {"partitioner": {"name": "iid_contiguous", "shuffle_seed": None}}})
    assert recipe.data.partitioner == {"name": "iid_contiguous", "shuffle_seed": None}

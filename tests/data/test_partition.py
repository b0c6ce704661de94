import datasets
import numpy as np
import pytest

import fedllm.data  # noqa: F401  registers the partitioners
from fedllm.registry import PARTITIONERS, RecipeError

NUM_CATEGORIES = 8
# one row per partitioner: (options, num_clients); a new partitioner must join this matrix
MATRIX = {
    "iid": ({}, 10),
    "iid_contiguous": ({}, 10),
    "dirichlet": ({"alpha": 0.5}, 10),
    "by_column": ({}, NUM_CATEGORIES),
    "quantity_skew": ({"alpha": 0.5}, 10),
    "intertwined": ({"slow_categories": ["c0"], "slow_fraction": 0.3}, 10),
}
SEEDS = range(5)


@pytest.fixture(scope="module")
def rows():
    categories = [f"c{i % NUM_CATEGORIES}" for i in range(800)]
    return datasets.Dataset.from_dict({"category": categories, "text": [f"row {i}" for i in range(800)]})


def build(name, **options):
    return PARTITIONERS.build({"name": name, **options})


def category_mix(codes, part) -> np.ndarray:
    return np.bincount(codes[part], minlength=NUM_CATEGORIES) / len(part)


def distance_to_global(rows, parts, weighted=False) -> float:
    """Mean total-variation distance between each client's category mix and the whole set's."""
    codes = np.array([int(c[1:]) for c in rows.to_dict()["category"]])
    overall = category_mix(codes, np.arange(len(rows)))
    distances = [0.5 * np.abs(category_mix(codes, p) - overall).sum() for p in parts]
    weights = [len(p) for p in parts] if weighted else None
    return float(np.average(distances, weights=weights))


def size_spread(parts) -> float:
    sizes = np.array([len(p) for p in parts])
    return float(sizes.std() / sizes.mean())


def test_every_registered_partitioner_is_in_the_matrix():
    assert set(PARTITIONERS.names()) == set(MATRIX)


@pytest.mark.parametrize("name", sorted(MATRIX))
def test_parts_are_disjoint_cover_every_row_and_are_never_empty(rows, name):
    options, num_clients = MATRIX[name]
    parts = build(name, **options).partition(rows, num_clients, seed=0)
    assert len(parts) == num_clients
    flat = [i for part in parts for i in part]
    assert sorted(flat) == list(range(len(rows)))
    assert all(len(part) > 0 for part in parts)
    assert all(type(i) is int for i in flat)


@pytest.mark.parametrize("name", sorted(MATRIX))
def test_same_seed_same_parts_and_random_partitioners_change_with_the_seed(rows, name):
    options, num_clients = MATRIX[name]
    partitioner = build(name, **options)
    first = partitioner.partition(rows, num_clients, seed=3)
    assert build(name, **options).partition(rows, num_clients, seed=3) == first
    other = partitioner.partition(rows, num_clients, seed=4)
    # the natural split has no randomness in it; Flower's IID shards have their own fixed shuffle seed
    assert (other == first) == (name in ("by_column", "iid_contiguous"))


def test_dirichlet_skews_category_mix_more_as_alpha_shrinks(rows):
    def mean_distance(name, **options):
        return np.mean([distance_to_global(rows, build(name, **options).partition(rows, 10, s)) for s in SEEDS])

    iid = mean_distance("iid")
    skewed, mild, flat = (mean_distance("dirichlet", alpha=a) for a in (0.1, 1.0, 100.0))
    assert iid < 0.2  # sampling noise only
    assert skewed > 0.5 > mild > flat
    assert skewed > 3 * iid


def test_quantity_skew_makes_sizes_unequal_but_keeps_the_category_mix(rows):
    iid = [build("iid").partition(rows, 10, s) for s in SEEDS]
    skewed = [build("quantity_skew", alpha=0.3).partition(rows, 10, s) for s in SEEDS]
    assert max(size_spread(p) for p in iid) < 0.01
    assert min(size_spread(p) for p in skewed) > 0.5
    # weighted by size, since a 3-row client's mix is noisy whatever the partitioner
    assert np.mean([distance_to_global(rows, p, weighted=True) for p in skewed]) < 0.15


def test_dirichlet_honours_min_size(rows):
    parts = build("dirichlet", alpha=0.3, min_size=25).partition(rows, 10, seed=0)
    assert min(len(p) for p in parts) >= 25
    parts = build("quantity_skew", alpha=0.1, min_size=40).partition(rows, 10, seed=0)
    assert min(len(p) for p in parts) >= 40


def test_by_column_gives_one_client_per_value_in_sorted_order(rows):
    parts = build("by_column").partition(rows, NUM_CATEGORIES, seed=0)
    categories = rows.to_dict()["category"]
    assert [{categories[i] for i in part} for part in parts] == [{f"c{k}"} for k in range(NUM_CATEGORIES)]


def test_by_column_says_how_many_clients_it_needs(rows):
    with pytest.raises(RecipeError, match=r"has 8 values.*federation.num_clients=8 \(it is 5\)"):
        build("by_column").partition(rows, 5, seed=0)


@pytest.mark.parametrize("name", ["iid", "dirichlet", "quantity_skew"])
def test_more_clients_than_rows_is_a_clear_error(name):
    tiny = datasets.Dataset.from_dict({"category": ["a", "b", "a"]})
    with pytest.raises(RecipeError, match="cannot give 4 clients at least 1 row.*only 3 rows"):
        build(name).partition(tiny, 4, seed=0)


@pytest.mark.parametrize("name", ["dirichlet", "by_column"])
def test_missing_column_names_the_column_and_the_columns_present(rows, name):
    with pytest.raises(RecipeError, match=r"needs a 'topic' column.*columns: category, text"):
        build(name, column="topic").partition(rows, NUM_CATEGORIES, seed=0)


def test_dirichlet_gives_up_after_bounded_draws_with_the_fix(rows):
    # 80 clients that must each get 8 of the 800 rows, from shares this skewed: hopeless
    with pytest.raises(RecipeError, match=r"in each of 200 draws.*Raise data.partitioner.alpha"):
        build("dirichlet", alpha=0.05, min_size=8).partition(rows, 80, seed=0)


def test_options_are_checked_when_built():
    with pytest.raises(RecipeError, match="alpha must be > 0"):
        build("dirichlet", alpha=0.0)
    with pytest.raises(RecipeError, match="unknown key 'data.partitioner.alpah'"):
        PARTITIONERS.build({"name": "dirichlet", "alpah": 0.1}, where="data.partitioner")


def test_intertwined_puts_the_slow_categories_only_on_the_slow_clients():
    from fedllm.data.intertwined import Intertwined

    rows = datasets.Dataset.from_dict({"category": ["a", "b", "c", "d"] * 25})
    parts = Intertwined(["c", "d"], slow_fraction=0.3).partition(rows, 10, seed=0)
    assert sorted(i for p in parts for i in p) == list(range(100))
    cats = [{rows[i]["category"] for i in p} for p in parts]
    assert all(c <= {"a", "b"} for c in cats[:7]) and all({"c", "d"} <= c for c in cats[7:])  # ⌈0.3·10⌉ = 3 slow
    assert parts == Intertwined(["c", "d"], slow_fraction=0.3).partition(rows, 10, seed=0)
    with pytest.raises(RecipeError, match="not values"):
        Intertwined(["z"]).partition(rows, 10, seed=0)

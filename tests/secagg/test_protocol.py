"""A secure sum is Flower's SecAgg+ run for real (its workflow and mod, in-process): the
unmasked sum equals the plain weighted sum within the quantisation bound, a party that drops
after masking is recovered from the shares, too few parties halt the round, and a single
masked upload tells nothing of its update."""
import io

import numpy as np
import pytest

pytest.importorskip("flwr")

from fedllm.secagg.protocol import SecAggOptions, fold_weight, secure_sum, sum_bound, unfold_weight  # noqa: E402

OPTIONS = SecAggOptions(num_shares=3, reconstruction_threshold=2)
MAX_WEIGHT = 100.0


def parties(n: int, size: int = 1000, seed: int = 0) -> tuple[dict, dict, dict]:
    rng = np.random.default_rng(seed)
    updates = {node: [rng.normal(0, 0.01, size), rng.normal(0, 0.01, (3, 4))] for node in range(1, n + 1)}
    weights = {node: float(10 * node) for node in updates}
    vectors = {node: fold_weight(updates[node], weights[node], MAX_WEIGHT, OPTIONS.clipping_range) for node in updates}
    return updates, weights, vectors


def plain_sum(updates: dict, weights: dict, nodes) -> list[np.ndarray]:
    return [sum(weights[n] / MAX_WEIGHT * updates[n][i] for n in nodes) for i in range(2)]


@pytest.mark.parametrize("n", [3, 10])
def test_the_unmasked_sum_is_the_weighted_sum_within_the_quantisation_bound(n):
    np.random.seed(0)
    updates, weights, vectors = parties(n)
    alive, summed = secure_sum(vectors, OPTIONS if n == 3 else SecAggOptions(num_shares=5, reconstruction_threshold=3))
    assert alive == sorted(vectors)
    tensors, total_weight = unfold_weight(summed, MAX_WEIGHT, OPTIONS.clipping_range)
    bound = sum_bound(n, OPTIONS)
    errors = [float(np.abs(got - want).max()) for got, want in zip(tensors, plain_sum(updates, weights, alive))]
    assert max(errors) <= bound and max(errors) > bound / 100  # really quantised, really within
    assert abs(total_weight - sum(weights.values())) <= bound / OPTIONS.clipping_range * MAX_WEIGHT
    assert [t.shape for t in tensors] == [(1000,), (3, 4)]


def test_a_party_that_drops_after_masking_is_summed_or_recovered_and_too_few_halt_the_round():
    np.random.seed(1)
    updates, weights, vectors = parties(4)
    # dropped at the masked upload: its masks are removed through the others' shares, the sum is of 3
    alive, summed = secure_sum(vectors, OPTIONS, drop=lambda node, stage: node == 2 and stage == "collect_masked_vectors")
    assert alive == [1, 3, 4]
    tensors, total = unfold_weight(summed, MAX_WEIGHT, OPTIONS.clipping_range)
    assert np.abs(tensors[0] - plain_sum(updates, weights, alive)[0]).max() <= sum_bound(3, OPTIONS)
    assert total == pytest.approx(sum(weights[n] for n in alive), abs=1e-3)
    # dropped at unmasking, after its masked vector arrived: it is still in the sum
    alive, _ = secure_sum(vectors, OPTIONS, drop=lambda node, stage: node == 2 and stage == "unmask")
    assert alive == [1, 2, 3, 4]
    # two of four gone before the sum: below the reconstruction threshold of some survivor: halted
    gone = {2, 3}
    assert secure_sum(vectors, OPTIONS, drop=lambda node, stage: node in gone and stage == "collect_masked_vectors") is None
    # a drop before masking (key exchange) ends Flower's round: the caller retries it
    assert secure_sum(vectors, OPTIONS, drop=lambda node, stage: node == 2 and stage == "share_keys") is None


def test_a_single_masked_upload_looks_uniform_whatever_its_update():
    """What the server receives from one party is its quantised vector plus masks mod M: for an
    update of all zeros and one of all +c alike, the entries are spread uniformly over [0, M)."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    from fedllm.secagg import protocol

    seen = {}

    class Spy(protocol.InProcessGrid):
        def send_and_receive(self, messages, *, timeout=None):
            replies = super().send_and_receive(messages, timeout=timeout)
            for reply in replies:
                configs = reply.content.config_records.get(RECORD_KEY_CONFIGS, {})
                if Key.MASKED_PARAMETERS in configs:
                    seen[reply.metadata.src_node_id] = np.concatenate(
                        [np.load(io.BytesIO(b)).reshape(-1) for b in configs[Key.MASKED_PARAMETERS]])
            return replies

    size = 64_000  # large enough that a 1e-4 level (a flake in 5,000 runs) is still a tight bound
    vectors = {1: [np.zeros(size)], 2: [np.full(size, OPTIONS.clipping_range)], 3: [np.zeros(size)]}
    nodes = sorted(vectors)
    grid = Spy(protocol.party_app(vectors.__getitem__), nodes)
    assert protocol.run_workflow(grid, nodes, OPTIONS, 0) is not None
    modulus = OPTIONS.modulus_range
    for node in (1, 2):
        u = np.sort(seen[node][:size].astype(np.float64) / modulus)
        ks = np.abs(u - np.arange(1, size + 1) / size).max()  # Kolmogorov-Smirnov distance to U(0, 1)
        assert ks < 2.23 / np.sqrt(size), (node, ks)  # the 1e-4 critical value: 0.0088, was 0.026 at 1% of 4,000
    assert abs(np.corrcoef(seen[1][:size], seen[2][:size])[0, 1]) < 0.02  # 5 standard deviations

import pytest

from fedllm.strategies.base import RunInfo


@pytest.fixture
def run_info():
    """Builds what the engine's `setup(run)` hands a strategy (fedllm.strategies.base.RunInfo)."""

    def build(rounds=10, num_clients=4, clients_per_round=None, sampler="uniform", client_sizes=None,
              local_steps=None, batch_size=8, seed=0, privacy=None):
        sizes = client_sizes or [100] * num_clients
        return RunInfo(
            rounds=rounds, num_clients=num_clients, clients_per_round=clients_per_round or num_clients,
            sampler=sampler, client_sizes=sizes, local_steps=local_steps or [10] * len(sizes),
            batch_size=batch_size, seed=seed, privacy=privacy,
        )

    return build

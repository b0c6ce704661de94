"""Which clients take part in a round. Seeded by (seed, round) so that resume and every
rank draw the same clients without talking to each other."""
from __future__ import annotations

import numpy as np

from fedllm.registry import SAMPLERS
from fedllm.seeds import derive


@SAMPLERS.register("uniform")
class Uniform:
    """k clients uniformly without replacement, a fresh draw every round."""

    def sample(self, round: int, num_clients: int, k: int, seed: int) -> list[int]:
        rng = np.random.default_rng(derive(seed, round, tag="sampler"))
        return sorted(rng.choice(num_clients, size=k, replace=False).tolist())


@SAMPLERS.register("poisson")
class Poisson:
    """Each client joins a round independently with probability q = k / N: k clients on
    average, any number in a given round, none included. The sampling that "amplification by
    sampling" analyses under add/remove-one (Abadi et al. 2016; McMahan et al. 2018, §2), so
    dp_fedavg accounts a Poisson-subsampled Gaussian with it."""

    def sample(self, round: int, num_clients: int, k: int, seed: int) -> list[int]:
        rng = np.random.default_rng(derive(seed, round, tag="poisson-sampler"))
        return np.flatnonzero(rng.random(num_clients) < k / num_clients).tolist()



class Participation:
    """Who a sampler picks in each round, replayed on demand (a pure function of the seed),
    so the server knows the last round a client took part in without storing it."""

    def __init__(self, sampler, num_clients: int, k: int, seed: int):
        self.sampler, self.num_clients, self.k, self.seed = sampler, num_clients, k, seed
        self._rounds: list[list[int]] = []

    def sampled(self, round: int) -> list[int]:
        while len(self._rounds) <= round:
            self._rounds.append(self.sampler.sample(len(self._rounds), self.num_clients, self.k, self.seed))
        return self._rounds[round]

    def last_round(self, client_id: int, before: int) -> int:
        """The last round < `before` in which the client was sampled (0 if none: it holds x^0)."""
        return next((s for s in range(before - 1, -1, -1) if client_id in self.sampled(s)), 0)

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

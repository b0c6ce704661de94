"""Simulated Byzantine clients, for robustness experiments (recipe section `byzantine:`).

An attack picks its clients once per run (`choose`), may poison their local data
(`poison_data`, e.g. label flipping) and may replace their messages each round
(`poison_updates`, on the server's full list of (client_id, message, weight), so that
omniscient attacks such as ALIE and IPM can use the honest messages).

Message attacks rewrite every tensor of a Byzantine message — the update and any strategy
extras beside it (e.g. the client momentum robust rules aggregate) — key by key."""
from __future__ import annotations

from statistics import NormalDist

import numpy as np
import torch

from fedllm.registry import ATTACKS
from fedllm.seeds import derive
from fedllm.strategies.base import Update


class Attack:
    def __init__(self, count: int):
        if count < 0:
            raise ValueError("byzantine.count must be ≥ 0")
        self.count = count

    def choose(self, num_clients: int, seed: int) -> set[int]:
        if self.count > num_clients:
            raise ValueError(f"byzantine.count={self.count} exceeds the {num_clients} clients")
        rng = np.random.default_rng(derive(seed, tag="byzantine"))
        return set(rng.choice(num_clients, self.count, replace=False).tolist())

    def poison_data(self, examples: list[dict], seed: int) -> list[dict]:
        return examples

    def poison_updates(self, kept: list, byzantine: set[int], round: int) -> list:
        return kept


class MessageAttack(Attack):
    """Replaces each Byzantine message by `forge(own message, honest messages of the round)`."""

    def forge(self, own: dict, honest: list[dict], n: int, f: int) -> dict:
        raise NotImplementedError

    def poison_updates(self, kept: list, byzantine: set[int], round: int) -> list:
        honest = [m for cid, m, _ in kept if cid not in byzantine]
        f, n = sum(cid in byzantine for cid, _, _ in kept), len(kept)

        def forged(own: Update) -> Update:  # every forge works key by key: Δ and extras alike
            return Update(self.forge(own.delta, [h.delta for h in honest], n, f),
                          self.forge(own.extras, [h.extras for h in honest], n, f))

        return [(cid, forged(m) if cid in byzantine else m, w) for cid, m, w in kept]


def honest_stack(honest: list[dict], key: str) -> torch.Tensor:
    return torch.stack([m[key].float() for m in honest])


@ATTACKS.register("sign_flip")
class SignFlip(MessageAttack):
    """Byzantine clients send −scale × their own honest update."""

    def __init__(self, count: int = 1, scale: float = 1.0):
        super().__init__(count)
        self.scale = scale

    def forge(self, own, honest, n, f):
        return {k: -self.scale * t for k, t in own.items()}


@ATTACKS.register("large_norm")
class LargeNorm(MessageAttack):
    """Byzantine clients send their update scaled by `scale` (default 1e3)."""

    def __init__(self, count: int = 1, scale: float = 1e3):
        super().__init__(count)
        self.scale = scale

    def forge(self, own, honest, n, f):
        return {k: self.scale * t for k, t in own.items()}


@ATTACKS.register("alie")
class ALittleIsEnough(MessageAttack):
    """ALIE (Baruch et al. 2019): μ − z·σ of the honest messages, coordinate-wise."""

    def __init__(self, count: int = 1, z: float | None = None):
        # z = null: the paper's z_max = Φ⁻¹((n − s)/n), s = ⌊n/2 + 1⌋ − f (Sec. 3), per round
        super().__init__(count)
        self.z = z

    def z_for(self, n: int, f: int) -> float:
        if self.z is not None:
            return self.z
        s = n // 2 + 1 - f
        return NormalDist().inv_cdf(min(max((n - s) / n, 1e-6), 1 - 1e-6))

    def forge(self, own, honest, n, f):
        if not honest:  # nobody to hide among: send the own update unchanged
            return own
        z = self.z_for(n, f)
        forged = {}
        for k, t in own.items():
            stack = honest_stack(honest, k)
            forged[k] = (stack.mean(0) - z * stack.std(0, correction=0)).to(t.dtype)
        return forged


@ATTACKS.register("ipm")
class InnerProductManipulation(MessageAttack):
    """IPM (Xie et al. 2020): −ε × the mean of the honest messages."""

    def __init__(self, count: int = 1, epsilon: float = 0.1):
        super().__init__(count)
        self.epsilon = epsilon

    def forge(self, own, honest, n, f):
        if not honest:
            return {k: -self.epsilon * t for k, t in own.items()}
        return {k: (-self.epsilon * honest_stack(honest, k).mean(0)).to(t.dtype) for k, t in own.items()}


def split_response(example: dict) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, response ids, response labels): the response starts at the first
    trained token (labels ≠ −100); a multi-turn example keeps its later untrained spans."""
    labels = example["labels"]
    start = next(i for i, label in enumerate(labels) if label != -100)
    return example["input_ids"][:start], example["input_ids"][start:], labels[start:]


@ATTACKS.register("label_flip")
class LabelFlip(Attack):
    """Data poisoning: each Byzantine client's prompts get the responses of its other examples."""

    # The instruction-tuning analogue of flipping class labels: the "label" of an example is
    # its response, so the client learns to answer every prompt with a wrong (but fluent)
    # answer. Responses follow a random cyclic permutation — no example keeps its own — and
    # the result is cut to the longest original example, so it fits data.max_length; the
    # prompt always leaves at least one response token.

    def __init__(self, count: int = 1):
        super().__init__(count)

    def poison_data(self, examples: list[dict], seed: int) -> list[dict]:
        if len(examples) < 2:
            return examples
        order = np.random.default_rng(derive(seed, tag="label-flip")).permutation(len(examples))
        partner = {int(order[j]): int(order[(j + 1) % len(order)]) for j in range(len(order))}
        limit = max(len(e["input_ids"]) for e in examples)
        poisoned = []
        for i, example in enumerate(examples):
            prompt, _, _ = split_response(example)
            _, response, labels = split_response(examples[partner[i]])
            poisoned.append({
                **example,
                "input_ids": (prompt + response)[:limit],
                "labels": ([-100] * len(prompt) + labels)[:limit],
            })
        return poisoned

"""The strategy contract: math on `dict[str, Tensor]`, no processes, devices or files.

The engine hands `aggregate` the sample-weighted mean of the clients' updates
(Δ_i = x_i − x^t, streamed as a running sum, or all-reduced across ranks) when the
strategy is `linear`, and every (update, weight) pair otherwise (robust rules).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

State = dict[str, torch.Tensor]


@dataclass
class RoundInfo:
    round: int  # 0-based index of the round being aggregated
    clients: list[int]  # the clients whose updates were accepted this round
    total_weight: float  # sum of their weights (sample counts)
    num_clients: int  # N, the size of the federation
    extra: dict = field(default_factory=dict)


class ClientHooks:
    """Client-side part of a strategy, called by the local training loop.

    `begin` sees the global point x^t before the first local step; `before_step` may edit
    the gradients of the trainable parameters (after backward, before clipping)."""

    def begin(self, params: dict[str, torch.nn.Parameter], global_state: State) -> None:
        pass

    def before_step(self, params: dict[str, torch.nn.Parameter]) -> None:
        pass


class Strategy:
    linear = True

    def init(self, global_state: State) -> State:
        """Server state (momenta, moments, ...), saved with every checkpoint."""
        return {}

    def client_hooks(self, round: int, client_id: int) -> ClientHooks | None:
        return None

    def aggregate(self, global_state: State, mean_update: State, server_state: State, info: RoundInfo) -> tuple[State, State]:
        raise NotImplementedError


def add_scaled(x: State, d: State, scale: float) -> State:
    """x + scale·d, in the dtype of x (updates are fp32)."""
    return {k: (x[k].float() + scale * d[k].float()).to(x[k].dtype) for k in x}

"""How a round's client messages become the new global state. Three collectors share one
small interface — `add` each client's decoded message as it arrives (False: non-finite,
dropped), then `finish` once, after which every rank holds the same new global state:
- StreamedMean: linear strategies; a running float64 weighted sum, all-reduced;
- Gathered: robust rules and simulated attacks, which need every message at once;
- CoordinateMean: adapters that aggregate in their own compact coordinates (Ferret under
  a plain-mean strategy): no full-size update per client, the mean applied in place."""
from __future__ import annotations

from typing import Callable

import torch

from fedllm.distributed import all_gather_messages, all_reduce_sum_, canonical_shapes, pack, slices
from fedllm.strategies.base import ClientContext, ClientHooks, RoundInfo, State, with_prefix
from fedllm.wire import WireContext, serialized_size


SMALL = 2**20  # entries up to which one flat float64 copy per message is cheaper than a loop over tensors


class WeightedSum:
    """Running Σ w_i·u_i in float64, so a round's memory does not grow with its clients
    and the sum does not depend (beyond fp64 rounding) on how clients split over ranks."""

    def __init__(self, template: State):
        self.shapes = canonical_shapes(template)  # ranks all-reduce this buffer element by element
        self.size = sum(t.numel() for t in template.values())
        self.flat = torch.zeros(self.size + 1, dtype=torch.float64)

    def flatten(self, update: State) -> torch.Tensor:
        return pack(update, self.shapes)

    def add(self, update: State, weight: float) -> None:
        # tensor by tensor into the float64 buffer: no full-size temporary for a large update
        for key, _, where in slices(self.shapes):
            self.flat[where].add_(update[key].reshape(-1).cpu(), alpha=weight)
        self.flat[-1] += weight

    def add_flat(self, flat: torch.Tensor, weight: float) -> None:
        self.flat[:-1].add_(flat, alpha=weight)
        self.flat[-1] += weight

    @property
    def total_weight(self) -> float:
        return float(self.flat[-1])

    def mean(self) -> State:
        weight = self.flat[-1]
        return {key: (self.flat[where] / weight).to(torch.float32).reshape(shape) for key, shape, where in slices(self.shapes)}


def is_finite(update: State) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in update.values())


def weighted_mean(kept: list[tuple[int, State, float]], template: State) -> State:
    total = WeightedSum(template)
    for _, message, weight in kept:
        total.add(message, weight)
    return total.mean()


def message_template(fed, x_t: State, broadcast: State, round: int, lr: float) -> State:
    """The keys and shapes of a decoded client message, for a rank that has none this round
    but still takes part in the collectives: the update plus the strategy's extras."""
    hooks = fed.strategy.client_hooks(round, -1) or ClientHooks()
    zeros = {k: torch.zeros_like(t, dtype=torch.float32) for k, t in x_t.items()}
    hooks.begin(fed.params, ClientContext(round, -1, x_t, broadcast, {}, lr, 1))
    extras, _ = hooks.finish(fed.params, zeros)
    return {**zeros, **with_prefix(extras)}


def apply_strategy(fed, updates, info: RoundInfo) -> tuple[State, State]:
    new_global, server_state = fed.strategy.aggregate(
        {k: t.float() for k, t in fed.global_state.items()}, updates, fed.server_state, info
    )
    return {k: new_global[k].to(fed.global_state[k].dtype) for k in fed.global_state}, server_state


class StreamedMean:
    def __init__(self, template: Callable[[], State]):
        self.template, self.total = template, None

    def add(self, client_id: int, message: State, weight: float) -> bool:
        self.total = self.total or WeightedSum(message)
        if self.total.size > SMALL:  # a large update (full-parameter) is summed tensor by tensor
            if not is_finite(message):
                return False
            self.total.add(message, weight)
            return True
        flat = self.total.flatten(message)  # one flat copy serves the finiteness check and the sum
        if not bool(torch.isfinite(flat).all()):
            return False
        self.total.add_flat(flat, weight)
        return True

    def finish(self, fed, info: Callable[[float], RoundInfo]) -> tuple[State, State]:
        total = self.total or WeightedSum(self.template())
        all_reduce_sum_(total.flat, fed.device)
        return apply_strategy(fed, total.mean(), info(total.total_weight))

    def unchanged(self, fed) -> None:
        pass


class Gathered:
    def __init__(self, template: Callable[[], State], round: int, attack=None, byzantine: frozenset = frozenset()):
        self.template, self.kept = template, []
        self.round, self.attack, self.byzantine = round, attack, byzantine

    def add(self, client_id: int, message: State, weight: float) -> bool:
        if not is_finite(message):
            return False
        self.kept.append((client_id, message, weight))
        return True

    def finish(self, fed, info: Callable[[float], RoundInfo]) -> tuple[State, State]:
        template = self.kept[0][1] if self.kept else self.template()
        kept = all_gather_messages(self.kept, template, fed.device)
        if self.attack is not None:
            kept = self.attack.poison_updates(kept, self.byzantine, self.round)
        updates = kept if not fed.strategy.linear else weighted_mean(kept, template)
        return apply_strategy(fed, updates, info(sum(w for _, _, w in kept)))

    def unchanged(self, fed) -> None:
        pass


class CoordinateMean:
    """Sums the adapter's wire coordinates; at the end the round's compact aggregate is the
    download message, and the server applies it to x^t in place exactly as each client will
    (one reconstruction per round). The strategy is a plain mean, so it has nothing to add."""

    def __init__(self, fed, round: int):
        self.ctx = WireContext(round, -1, fed.recipe.seed)
        self.coords = fed.adapter.coordinate_sum(self.ctx)

    def add(self, client_id: int, message: State, weight: float) -> bool:
        if not is_finite(message):
            return False
        self.coords.add(message, weight, WireContext(self.ctx.round, client_id, self.ctx.seed))
        return True

    def finish(self, fed, info: Callable[[float], RoundInfo]) -> tuple[State, State]:
        self.coords.all_reduce(fed.device)
        download = self.coords.message()
        fed.adapter.apply_broadcast(download, fed.global_state, self.ctx)
        fed.broadcast_sizes.append(serialized_size(download))
        return fed.global_state, fed.server_state

    def unchanged(self, fed) -> None:
        fed.broadcast_sizes.append(0)  # nothing to download for this round


def collector(fed, round: int, template: Callable[[], State]):
    if fed.compact:
        return CoordinateMean(fed, round)
    if not fed.strategy.linear or fed.attack is not None:
        return Gathered(template, round, fed.attack, fed.byzantine)
    return StreamedMean(template)

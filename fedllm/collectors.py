"""How a round's client messages become the new global state. A collector takes each
client's decoded message as it arrives (`add`: False when non-finite, dropped), then
`finish`es once, after which every rank holds the same new global state. Chosen by what
the strategy declares it needs (`Strategy.needs`):
- StreamedMean ("mean", "plain_mean"): a running float64 weighted sum, all-reduced;
- Gathered ("all": robust rules; and simulated attacks): every message at once;
- an adapter's own (`Adapter.aggregation`: Ferret's coordinate sum under a plain mean)."""
from __future__ import annotations

import logging
from typing import Callable

import torch

from fedllm.distributed import Reducer, canonical_shapes, pack, slices
from fedllm.state import State, is_finite
from fedllm.strategies.base import ALL, RoundInfo, Strategy, Update

log = logging.getLogger("fedllm")
RoundInfoOf = Callable[[float], RoundInfo]  # the round's facts, given the accepted clients' total weight
AGGREGATE_NOT_FINITE = "non_finite_aggregate"  # metrics.REJECTIONS: accepted, but the round's aggregate was refused


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
        """Σ w_i·u_i / Σ w_i; zeros for a sum of nothing (a round no update reached)."""
        weight = self.flat[-1] if self.flat[-1] > 0 else 1.0
        return {key: (self.flat[where] / weight).to(torch.float32).reshape(shape) for key, shape, where in slices(self.shapes)}


def flat(update: Update) -> dict:
    """Δ and extras as one dict keyed by (part, name), for sums and collectives over both."""
    return {**{("delta", k): t for k, t in update.delta.items()}, **{("extras", k): t for k, t in update.extras.items()}}


def unflat(tensors: dict) -> Update:
    parts = {"delta": {}, "extras": {}}
    for (part, name), t in tensors.items():
        parts[part][name] = t
    return Update(parts["delta"], parts["extras"])


def weighted_mean(kept: list[tuple[int, Update, float]], template: Update) -> Update:
    total = WeightedSum(flat(template))
    for _, message, weight in kept:
        total.add(flat(message), weight)
    return unflat(total.mean())


def message_template(strategy: Strategy, global_state: State) -> Update:
    """The keys and shapes a decoded client message must have — the update plus the
    strategy's extras — from the global state, never from a message (meta tensors: no memory)."""
    shapes = {k: torch.empty(t.shape, dtype=torch.float32, device="meta") for k, t in global_state.items()}
    extras = {k: t.to("meta") for k, t in strategy.extras_like(global_state).items()}
    return Update(shapes, extras)


def misfit(update: Update, expected: Update) -> str | None:
    """Why an untrusted decoded upload cannot enter the aggregate, or None."""
    for part in ("delta", "extras"):
        got, want = getattr(update, part), getattr(expected, part)
        if got.keys() != want.keys():
            extra, missing = sorted(got.keys() - want.keys()), sorted(want.keys() - got.keys())
            return f"its {part} has unexpected tensors {extra[:3]} / lacks {missing[:3]}"
        for key, t in got.items():
            if t.shape != want[key].shape:
                return f"{part} tensor {key} has shape {tuple(t.shape)}, expected {tuple(want[key].shape)}"
            if t.is_floating_point() != want[key].is_floating_point():
                return f"{part} tensor {key} has dtype {t.dtype}, expected {want[key].dtype}"
    return None


def apply_strategy(strategy: Strategy, global_state: State, server_state: State, updates, info: RoundInfo) -> tuple[State, State]:
    new_global, server_state = strategy.aggregate({k: t.float() for k, t in global_state.items()}, updates, server_state, info)
    return {k: new_global[k].to(global_state[k].dtype) for k in global_state}, server_state


class StreamedMean:
    def __init__(self, template: Callable[[], Update]):
        self.template, self.total = template, None

    def add(self, client_id: int, update: Update, weight: float) -> bool:
        message = flat(update)
        self.total = self.total or WeightedSum(flat(self.template()))
        if self.total.size > SMALL:  # a large update (full-parameter) is summed tensor by tensor
            if not is_finite(message):
                return False
            self.total.add(message, weight)
            return True
        vector = self.total.flatten(message)  # one flat copy serves the finiteness check and the sum
        if not bool(torch.isfinite(vector).all()):
            return False
        self.total.add_flat(vector, weight)
        return True

    def finish(self, strategy: Strategy, global_state: State, server_state: State, info: RoundInfoOf,
               reducer: Reducer) -> tuple[State, State]:
        total = self.total or WeightedSum(flat(self.template()))
        reducer.sum_(total.flat)
        return apply_strategy(strategy, global_state, server_state, unflat(total.mean()), info(total.total_weight))

    def unchanged(self) -> None:
        pass


class Gathered:
    def __init__(self, template: Callable[[], Update], round: int, attack=None, byzantine: frozenset = frozenset()):
        self.template, self.kept = template, []
        self.round, self.attack, self.byzantine = round, attack, byzantine
        self.forged_non_finite: list[int] = []  # clients whose forged message the filter dropped

    def add(self, client_id: int, message: Update, weight: float) -> bool:
        if not is_finite(flat(message)):
            return False
        self.kept.append((client_id, message, weight))
        return True

    def finish(self, strategy: Strategy, global_state: State, server_state: State, info: RoundInfoOf,
               reducer: Reducer) -> tuple[State, State]:
        template = self.template()
        gathered = reducer.gather_messages([(cid, flat(m), w) for cid, m, w in self.kept], flat(template))
        kept = [(cid, unflat(m), w) for cid, m, w in gathered]
        if self.attack is not None:
            # a forged message arrives like any other: the same finiteness filter applies to it
            poisoned = self.attack.poison_updates(kept, self.byzantine, self.round)
            kept = [(cid, m, w) for cid, m, w in poisoned if is_finite(flat(m))]
            self.forged_non_finite = sorted({cid for cid, _, _ in poisoned} - {cid for cid, _, _ in kept})
            if len(kept) < len(poisoned):
                log.warning("round %d: %d forged update(s) were non-finite and dropped", self.round, len(poisoned) - len(kept))
            if not kept:
                return global_state, server_state
        updates = kept if strategy.needs == ALL else weighted_mean(kept, template)
        return apply_strategy(strategy, global_state, server_state, updates, info(sum(w for _, _, w in kept)))

    def unchanged(self) -> None:
        pass


def finite_or_previous(where: str, new: tuple[State, State], previous: tuple[State, State] | None,
                       clients: list[int]) -> tuple[State, State, bool]:
    """The round's new (global, server state) if every tensor of both is finite; else the
    previous pair, with a warning naming the round (`where`): a non-finite aggregate is never
    applied, whatever drove the round. Also returns whether the new pair was taken. `previous`
    None: the collector applied its aggregate in place (an adapter's own aggregation), so
    there is nothing to go back to and the run stops instead of going on from NaN/Inf."""
    if is_finite(new[0]) and is_finite(new[1]):
        return new[0], new[1], True
    if previous is None:
        raise RuntimeError(f"{where}: the aggregate of clients {clients} is not finite (NaN/Inf) and the adapter's own "
                           "aggregation applied it in place: the run stops; resume it from its last checkpoint")
    log.warning("%s: the aggregate of clients %s is not finite (NaN/Inf); refused, the global model and server state "
                "stay as they were", where, clients)
    return previous[0], previous[1], False


def default_collector(strategy: Strategy, template: Callable[[], Update], round: int, attack=None,
                      byzantine: frozenset = frozenset()):
    """The collector a strategy's `needs` call for; a simulated attack needs every message."""
    if strategy.needs == ALL or attack is not None:
        return Gathered(template, round, attack, byzantine)
    return StreamedMean(template)

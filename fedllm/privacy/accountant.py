"""Privacy accounting with Google's `dp-accounting` library (RDP, or PLD for tighter numbers).

A ledger is a short table of events — (kind, noise multiplier, sampling, count) — kept as one
float64 tensor, so it is saved with the server state and a resumed run continues the same
ledger (ε stays continuous). ε is recomputed from the table by the library; nothing here
re-derives privacy formulas. The noise multiplier of an event is always σ / sensitivity
under the event's neighbouring relation:

- `gaussian`: no sampling; add/remove-one neighbours. Gaussian events compose exactly into
  one Gaussian with z = (Σ z_t⁻²)^(-1/2) (their privacy-loss distributions are Gaussian), so
  rounds with changing noise keep the table one row long.
- `poisson`: each record (or client) takes part independently with probability `rate`;
  add/remove-one neighbours (the DP-SGD analysis of Abadi et al. 2016 / Mironov et al. 2019).
- `without_replacement`: a uniformly random subset of `sample` out of `population` (how the
  uniform sampler picks clients); replace-one neighbours, the relation under which the
  library's bound (Wang, Balle & Kasiviswanathan 2019, Thm 27) holds. Under replace-one a
  clipped sum moves by up to 2S, so callers pass z/2. RDP only (the PLD accountant has no
  such event).

Reference check: one Gaussian event with z = 1 at δ = 1e-5 gives ε = 4.7285 under RDP (the
same conversion Opacus uses, Balle et al. 2020 Thm 21 / Canonne et al. 2020 Prop 12)."""
from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import torch

from fedllm.lazy import LazyModule

dp_accounting = LazyModule("dp_accounting")  # imported on first use (fedllm.lazy)
rdp_lib = LazyModule("dp_accounting.rdp.rdp_privacy_accountant")

Method = Literal["rdp", "pld"]
KINDS = ("gaussian", "poisson", "without_replacement")
# dp_accounting's DEFAULT_RDP_ORDERS (⊇ Opacus' grid), written out so that importing this module
# does not load the library; tests/test_imports.py checks that they are the same
ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024])


@dataclass(frozen=True)
class Event:
    noise: float  # z = σ / sensitivity
    kind: str = "gaussian"
    rate: float = 1.0  # poisson: sampling probability
    population: int = 0  # without_replacement: N
    sample: int = 0  # without_replacement: m

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown privacy event '{self.kind}'; known: {', '.join(KINDS)}")
        if not self.noise > 0:
            raise ValueError(f"a privacy event needs a positive noise multiplier, got {self.noise}")

    def to_library(self) -> dp_accounting.DpEvent:
        gaussian = dp_accounting.GaussianDpEvent(self.noise)
        if self.kind == "poisson":
            return dp_accounting.PoissonSampledDpEvent(self.rate, gaussian)
        if self.kind == "without_replacement":
            return dp_accounting.SampledWithoutReplacementDpEvent(self.population, self.sample, gaussian)
        return gaussian

    def row(self, count: float) -> list[float]:
        return [KINDS.index(self.kind), self.noise, self.rate, self.population, self.sample, count]


@contextlib.contextmanager
def quiet_library():
    # dp-accounting logs a warning for every RDP order where a series fails to converge
    # (small orders at small noise) and then drops that order: correct, but noisy.
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@functools.lru_cache(maxsize=4096)
def rdp_of(event: Event) -> np.ndarray:
    """RDP curve of one event over ORDERS (cached: ledgers repeat the same few events)."""
    accountant = dp_accounting.rdp.RdpAccountant(list(ORDERS), relation_of([event]))
    with quiet_library():
        accountant.compose(event.to_library())
    return accountant.rdp


def relation_of(events) -> dp_accounting.NeighboringRelation:
    kinds = {e.kind for e in events}
    if "without_replacement" in kinds and len(kinds) > 1:
        raise ValueError("a ledger cannot mix sampling without replacement (replace-one) with other events (add/remove)")
    if kinds == {"without_replacement"}:
        return dp_accounting.NeighboringRelation.REPLACE_ONE
    return dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE


def epsilon_of(events: dict[Event, float], delta: float, method: Method = "rdp") -> float:
    """ε at δ of the composition of `events` ({event: count})."""
    return _epsilon(frozenset((e, c) for e, c in events.items() if c > 0), delta, method)


@functools.lru_cache(maxsize=4096)  # many clients share the same ledger
def _epsilon(events: frozenset, delta: float, method: Method) -> float:
    events = dict(events)
    if not events:
        return 0.0
    relation = relation_of(events)  # also refuses mixed neighbouring relations
    if method == "rdp":
        total = sum(count * rdp_of(event) for event, count in events.items())
        return float(rdp_lib.compute_epsilon(list(ORDERS), total, delta)[0])
    if any(e.kind == "without_replacement" for e in events):
        raise ValueError("the PLD accountant has no sampling-without-replacement event: use accountant: rdp")
    accountant = dp_accounting.pld.PLDAccountant(relation)
    with quiet_library():
        for event, count in events.items():
            accountant.compose(event.to_library(), int(count))
    return float(accountant.get_epsilon(delta))


class Ledger:
    """The events a privacy unit (the federation, or one client) has spent."""

    def __init__(self, state: torch.Tensor | None = None):
        self.events: dict[Event, float] = {}
        for kind, noise, rate, population, sample, count in (state.tolist() if state is not None else []):
            self.events[Event(noise, KINDS[int(kind)], rate, int(population), int(sample))] = count

    def compose(self, event: Event, count: float = 1) -> "Ledger":
        if event.kind == "gaussian":  # fold every Gaussian into one: z = (Σ count/z²)^(-1/2)
            precision = count / event.noise**2
            for old in [e for e in self.events if e.kind == "gaussian"]:
                precision += self.events.pop(old) / old.noise**2
            event, count = Event(precision**-0.5), 1
        self.events[event] = self.events.get(event, 0) + count
        return self

    def copy(self) -> "Ledger":
        other = Ledger()
        other.events = dict(self.events)
        return other

    def epsilon(self, delta: float, method: Method = "rdp") -> float:
        return epsilon_of(self.events, delta, method)

    def state(self) -> torch.Tensor:
        rows = [event.row(count) for event, count in self.events.items()]
        return torch.tensor(rows, dtype=torch.float64).reshape(-1, 6)


def library_event(events: dict[Event, float]) -> dp_accounting.DpEvent:
    return dp_accounting.ComposedDpEvent([dp_accounting.SelfComposedDpEvent(e.to_library(), int(c)) for e, c in events.items()])


def calibrate(events_for: Callable[[float], dict[Event, float]], target_epsilon: float, delta: float,
              method: Method = "rdp", tol: float = 1e-4) -> float:
    """The noise multiplier z (within `tol`, rounded up) whose composition `events_for(z)`
    spends ε = target_epsilon at δ — the library's root search (Brent's method)."""
    z_rdp = _root(events_for, target_epsilon, delta, "rdp", dp_accounting.LowerEndpointAndGuess(1e-2, 1.0), tol)
    if method == "rdp":
        return z_rdp + tol  # the root may sit a hair on the wrong side: round toward more noise
    # PLD must not start at z = 0.01 as RDP does: its discretised privacy loss spans a range
    # that grows like 1/z², which at small z is tens of GiB. RDP is an upper bound on the
    # same ε, so PLD's root lies at or below RDP's: bracket [z_rdp / 2, z_rdp] and widen only
    # if the target falls outside (a very loose RDP conversion below, discretisation above).
    lower, upper = z_rdp / 2, z_rdp + tol
    while epsilon_of(events_for(upper), delta, "pld") > target_epsilon:
        lower, upper = upper, upper * 2
    while epsilon_of(events_for(lower), delta, "pld") <= target_epsilon:
        lower, upper = lower / 2, lower
    bracket = dp_accounting.ExplicitBracketInterval(lower, upper)
    return _root(events_for, target_epsilon, delta, "pld", bracket, tol) + tol


def _root(events_for, target_epsilon: float, delta: float, method: Method, bracket, tol: float) -> float:
    relation = relation_of(events_for(1.0))

    def fresh():
        if method == "rdp":
            return dp_accounting.rdp.RdpAccountant(list(ORDERS), relation)
        return dp_accounting.pld.PLDAccountant(relation)

    with quiet_library():
        z = dp_accounting.calibrate_dp_mechanism(
            fresh, lambda z: library_event(events_for(z)), target_epsilon, delta, bracket, tol=tol,
        )
    return float(z)

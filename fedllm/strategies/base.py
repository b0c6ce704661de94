"""The strategy contract: math on `dict[str, Tensor]`, no processes, devices or files.

Server side: `init` makes the server state; `broadcast` picks server tensors sent down with
the global state (SCAFFOLD's c, a server momentum); `aggregate` makes the next global
state. A strategy declares what it `needs` of the round's messages: "mean" (the weighted
mean, streamed as a running sum and all-reduced across ranks), "all" (every
`(client_id, message, weight)`: robust rules), or "plain_mean" (the new global is exactly
x^t + mean Δ with no server state and no extras, so an adapter may aggregate in its own
coordinates and apply the mean itself — Ferret). `extras_like(global_state)` gives the
keys and shapes of what its hooks add to an upload. Client side: `client_hooks` returns
the hooks `fedllm.client.Client` drives around the local loop; their `finish` may add
tensors to the upload (`extras`) and return the client's new stored state. `client_needs`
names what the hooks need of the local loop (fedllm.training.CAPABILITIES), checked when
the recipe loads.

Before round 0 the engine calls `setup(run)` with the run's shape (`RunInfo`); after every
round it logs `metrics(server_state)`, and before every round it asks `stop_reason(round,
server_state)` — a privacy budget ends the run cleanly there (checkpoint, final export).

`aggregate` receives `Update`s: Δ keyed by the adapter's parameter names and the extras keyed
as the strategy's hooks named them (on the wire they share one message: fedllm.wire).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from fedllm.state import State


@dataclass
class Update:
    """A client's decoded upload, or the weighted mean of a round's uploads."""

    delta: State  # Δ = x_i − x^t (or what the hooks send in its place), keyed like the global state
    extras: State = field(default_factory=dict)  # the strategy's extra tensors (SCAFFOLD's Δc, ...)


@dataclass
class RoundInfo:
    round: int  # 0-based index of the round being aggregated
    clients: list[int]  # the clients whose messages were accepted this round
    total_weight: float  # sum of their weights
    num_clients: int  # N, the size of the federation
    lr: float = 0.0  # the clients' learning rate this round (η_l)
    local_steps: int = 0  # local optimizer steps per client (K)
    extra: dict = field(default_factory=dict)


@dataclass
class RunInfo:
    """The shape of a run, given to plugins (strategy, codecs) once before round 0."""

    rounds: int  # planned rounds
    num_clients: int  # N
    clients_per_round: int  # m
    sampler: str  # the client sampler's registered name
    client_sizes: list[int]  # examples per client
    local_steps: list[int]  # optimizer steps per local round, per client (before hooks' num_steps)
    batch_size: int  # examples per optimizer step (per-device batch × accumulation)
    seed: int
    privacy: dict | None = None  # the recipe's privacy: section (PrivacyConfig's fields), read by the DP strategies


@dataclass
class ClientContext:
    round: int
    client_id: int
    global_state: State  # x^t, on the training device
    broadcast: State  # the strategy's server tensors sent down this round (unprefixed)
    client_state: State  # this client's stored strategy state ({} before its first round)
    lr: float
    steps: int  # optimizer steps this local round
    gradient: Callable[[int | None], State] | None = None  # ∇ of the mean loss on the first n local examples (all: None), at x^t
    # the model's input embedding module (token ids -> embeddings), on request: input perturbations hook its output
    embed: Callable[[], torch.nn.Module] | None = None
    accumulation: int = 1  # micro-batches per optimizer step (a hook's own backward scales by 1/accumulation)
    # the ranks training this client together (federation.group_size > 1): sums tensors in place over
    # them, one all-reduce; None: this rank trains the client alone
    group_sum: Callable[[list[torch.Tensor]], None] | None = None
    group_leader: bool = True  # this rank adds what a group must add once (DP noise); True when alone
    group_member: int = 0  # this rank's place in its group: its share of a micro-batch of G·b starts at example member·b


class ClientHooks:
    """Client-side part of a strategy, driven by `fedllm.client.Client` around the local loop."""

    rewrites_update = False  # True: `finish` edits the update in place, so it gets a materialised dict
    # True: in a client group its `before_step` sums what it computed over the group itself
    # (ClientContext.group_sum), so the loop does not average `p.grad` there (per-example DP)
    sums_in_group = False

    def num_steps(self, default: int) -> int:
        """Local optimizer steps this round (0: no training, e.g. FedAMD's anchors)."""
        return default

    def begin(self, params: dict[str, torch.nn.Parameter], ctx: ClientContext) -> None:
        pass

    def backward(self, inputs: dict[str, torch.Tensor], loss_of: Callable[[dict], torch.Tensor],
                 default: Callable[[], torch.Tensor]) -> torch.Tensor:
        """One micro-batch: leave its gradient for `before_step` and return its mean loss.
        `default()` is the usual backward into `p.grad`; `loss_of(sub_batch)` runs the forward
        on any slice of `inputs` (DP-SGD: one backward per example, each clipped)."""
        return default()

    def before_step(self, params: dict[str, torch.nn.Parameter], regrad: Callable[[], None]) -> None:
        """After backward, before clipping and the optimizer step: may edit `p.grad`.
        `regrad()` recomputes the gradients on the same micro-batch at the parameters'
        current values (for ascent/perturbation steps); it needs gradient accumulation 1."""

    def finish(self, params: dict[str, torch.nn.Parameter], update: State) -> tuple[State, State | None]:
        """Returns (extra tensors to upload, the client's new stored state or None). May edit
        `update` in place (DP clipping, a client momentum sent instead of Δ): the engine sends
        the dict it passed."""
        return {}, None


MEAN, ALL, PLAIN_MEAN = "mean", "all", "plain_mean"


class Strategy:
    needs = MEAN  # what `aggregate` receives: MEAN, ALL, or PLAIN_MEAN (see the module docstring)
    uniform_weights = False  # True: every accepted client weighs 1 instead of its sample count
    client_needs: frozenset[str] = frozenset()  # capabilities its client hooks need of the local loop
    counts_in_extras = False  # True: `aggregate` counts 0/1 flags in the extras' mean, which must arrive exactly
    # the client.optim its method is derived for (a correction or momentum read back from plain
    # SGD steps); None: any local optimizer. Another one gets a warning when the recipe loads.
    local_optimizer: str | None = None
    # True: its client hooks clip per example themselves (DP-SGD), so the step driver must not
    # clip the (noisy) step gradient again with client.max_grad_norm
    clips_client_gradients = False
    # True: its per-micro-batch `backward` trains as its rank's share of a client group's batch
    # (per-example DP sums its clipped gradients over the group itself, ClientHooks.sums_in_group;
    # adversarial weights its loss as the loop does), so federation.group_size > 1 trains as one
    # rank with the group's batch
    per_example_in_groups = False
    # True: its client hooks take per-example gradients through torch.func (vmap of a functional
    # call), which DeepSpeed ZeRO-3's module hooks do not survive (federation.group_parallel=zero3)
    uses_torch_func = False
    # a DP strategy's reader of the recipe's privacy: section, check_privacy(options, privacy) -> budget;
    # the section is refused for a strategy without one
    check_privacy = None
    # True: `aggregate` runs a mechanism whose output must appear every round (server-side DP
    # noise): a round that no update reached still aggregates, an empty sum of weight 0
    releases_when_empty = False

    def extras_like(self, global_state: State) -> State:
        """Tensors shaped like the extras its hooks add to an upload (values unused)."""
        return {}

    def check_federation(self, clients_per_round: int) -> None:
        """Raises RecipeError when the planned round size cannot work (robust rules' n vs f);
        called when the recipe loads, before any model is built."""

    def setup(self, run: RunInfo) -> None:
        """Called once before round 0 (and again on resume), before `init`."""

    def init(self, global_state: State) -> State:
        """Server state (momenta, moments, control variates...), saved with every checkpoint."""
        return {}

    def broadcast(self, server_state: State) -> State:
        return {}

    def client_hooks(self, round: int, client_id: int) -> ClientHooks | None:
        return None

    def aggregate(self, global_state: State, updates, server_state: State, info: RoundInfo) -> tuple[State, State]:
        """`updates`: the weighted mean `Update` (needs MEAN / PLAIN_MEAN) or a list of
        (client_id, Update, weight) in client order (needs ALL)."""
        raise NotImplementedError

    def metrics(self, server_state: State) -> dict[str, float]:
        """Numbers logged with the round that produced `server_state` (e.g. the ε spent)."""
        return {}

    def stop_reason(self, round: int, server_state: State) -> str | None:
        """A reason to end the run cleanly before `round` (e.g. a privacy budget), or None."""
        return None


def add_scaled(x: State, d: State, scale: float) -> State:
    """x + scale·d over the keys of x, in the dtype of x (updates are fp32)."""
    return {k: (x[k].float() + scale * d[k].float()).to(x[k].dtype) for k in x}


def with_prefix(state: State, prefix: str) -> State:
    return {prefix + k: t for k, t in state.items()}


def strip_prefix(state: State, prefix: str) -> State:
    """The entries with the prefix, prefix removed."""
    return {k[len(prefix):]: t for k, t in state.items() if k.startswith(prefix)}


def split_prefix(state: State, prefix: str) -> tuple[State, State]:
    """(entries without the prefix, entries with it — prefix removed)."""
    return {k: t for k, t in state.items() if not k.startswith(prefix)}, strip_prefix(state, prefix)


class DelegatingHooks(ClientHooks):
    """Client hooks that pass every call to the wrapped strategy's hooks."""

    def __init__(self, inner: ClientHooks | None):
        self.inner = inner or ClientHooks()

    @property
    def rewrites_update(self) -> bool:
        return self.inner.rewrites_update

    @property
    def sums_in_group(self) -> bool:
        return self.inner.sums_in_group

    def num_steps(self, default):
        return self.inner.num_steps(default)

    def begin(self, params, ctx):
        self.inner.begin(params, ctx)

    def backward(self, inputs, loss_of, default):
        return self.inner.backward(inputs, loss_of, default)

    def before_step(self, params, regrad):
        self.inner.before_step(params, regrad)

    def finish(self, params, update):
        return self.inner.finish(params, update)

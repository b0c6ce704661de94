"""Local DP-SGD on the client's trainable tensors — Abadi et al., "Deep Learning with
Differential Privacy" (CCS 2016), Algorithm 1 — the setting of the FFA-LoRA paper (Sun et
al. 2024, §5: DP-SGD on each client, δ = 1e-5, ε ∈ {6, 3, 1}).

Every optimizer step of a local round, for the B examples of the step (micro-batches ×
gradient accumulation):

    g = (Σ_i clip(∇ℓ_i, C) + N(0, σ²C²·I)) / B,      clip(v, C) = v · min(1, C/‖v‖)

with ‖·‖ over all trainable tensors together (flat clipping, as Opacus). Per-example
gradients come from torch.func — vmap(grad(loss)) over the micro-batch's examples, a
functional call over the trainable tensors (`per_example: vmap`, the default, where the local
loop offers the loss as a function of the tensors) — or from one backward per example
(`per_example: loop`: exact for any model and adapter, no per-layer rules, the reference and
the fallback when vmap fails on a model). Both give the same clipped sums (tested to 1e-5);
vmap holds B per-example gradients at once (small for adapters). The optimiser then steps
on g as usual.

In a client group (`federation.group_size` G > 1: G ranks train one client on a shared draw
of G·b examples, b each) every rank clips the per-example gradients of its own b examples;
the group all-reduces the sums with the noise added once, by the group's leader to its own
sum before the reduction (its draw, broadcast in the same collective), and every rank
divides by G·b: the step one rank takes with batch G·b, and the noise of one mechanism, not
G. The accountant's rate is that of the group's batch (RunInfo.batch_size counts G). A
group's ranks are one party (the client's own devices): they may see each other's partial
sums in the all-reduce; what leaves the group is noised.

The noise must be secret from the server too, so its generator lives on the client, for one
local round: seeded from `secrets` when the round's hooks are made, never stored, never sent.
Not in the client store: that store is kept by the simulation's server and checkpointed with
the run, and a client whose update is dropped keeps its old stored state, so a stored
generator would draw the same noise again in its next round. The price: a resumed run draws
fresh noise for the rounds it redoes (no stream to continue). `privacy.noise_seed` seeds
each local round from (noise_seed, round, client) instead — reproducible, and not private.

Accounting is record-level and per client: each local step is a Poisson-subsampled Gaussian
with rate q_i = B / n_i and multiplier σ (Mironov et al. 2019), composed over the client's
steps and rounds. This is not what the local loop does: it draws fixed-size batches of B
from shuffled epochs (every example once per epoch), not Poisson batches in which each
example appears independently with probability q_i. The reported ε is therefore the
standard approximation used by most DP-SGD code, not a proof for the shuffled sampler, and
it can understate the true ε — by a large factor in some regimes (Chua et al. 2024, "How
Private are DP-SGD Implementations?"). Read it as "ε if batches were Poisson". Worse, the
amplification by sampling assumes nobody knows which examples a step used, while the
local loop's shuffles are seeded from the recipe seed and the round: with a public recipe
the batches are public, and the sound guarantee is the one without sampling (rate 1).

A client whose update is dropped (non-finite) releases nothing: its message is discarded
unused and its ledger does not move."""
from __future__ import annotations

import logging
import warnings
from dataclasses import replace
from typing import Callable

import torch

from fedllm.privacy.accountant import Event, Ledger, calibrate
from fedllm.privacy.budget import PREFIX, Budget, DelegatingHooks, PrivacyWrapper, check_privacy, secret_seed, split_state
from fedllm.registry import STRATEGIES, RecipeError
from fedllm.seeds import derive
from fedllm.strategies.base import ClientContext, RoundInfo, State

LEDGERS = PREFIX + "ledger/"
log = logging.getLogger("fedllm")


def single_examples(inputs: dict[str, torch.Tensor]):
    """The rows of a batch one at a time, trailing padding trimmed (it only costs time)."""
    mask = inputs.get("attention_mask")
    for i in range(next(iter(inputs.values())).shape[0]):
        length = int(mask[i].nonzero().max()) + 1 if mask is not None and mask[i].any() else None
        yield {k: v[i : i + 1, :length] if (length is not None and v.dim() > 1) else v[i : i + 1] for k, v in inputs.items()}


def looped_clipped_sum(params: dict[str, torch.nn.Parameter], inputs: dict, loss_of: Callable[[dict], torch.Tensor],
                       clip: float) -> tuple[State, torch.Tensor, int]:
    """(Σ_i clip(∇ℓ_i, C) per tensor in fp32, the mean loss, the number of examples): one
    backward per example. The reference, and the fallback where torch.func cannot go."""
    names = list(params)
    tensors = [params[k] for k in names]
    sums = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
    losses = []
    for one in single_examples(inputs):
        loss = loss_of(one)
        grads = torch.autograd.grad(loss, tensors, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, tensors)]
        norm = torch.sqrt(sum(g.float().pow(2).sum() for g in grads))
        scale = (clip / (norm + 1e-6)).clamp(max=1.0)  # Opacus' clip factor
        for k, g in zip(names, grads):
            sums[k].add_(g.float() * scale)
        losses.append(loss.detach().float())
    return sums, torch.stack(losses).mean(), len(losses)


def right_padded(inputs: dict) -> bool:
    """Every row's attention mask is ones then zeros (fedllm's collate pads on the right)."""
    mask = inputs.get("attention_mask")
    if mask is None:
        return True
    lengths = mask.sum(1, keepdim=True)
    return bool((mask == (torch.arange(mask.shape[1], device=mask.device) < lengths).to(mask.dtype)).all())


def vectorized_clipped_sum(params: dict[str, torch.nn.Parameter], inputs: dict, loss_of, clip: float
                           ) -> tuple[State, torch.Tensor, int]:
    """The same sums with per-example gradients from vmap(grad(...)) over the micro-batch.
    The attention mask is left out so every example keeps the batch's length: with right
    padding, a causal LM's real tokens attend only to earlier (real) tokens and padding
    carries label -100, so each example's loss and gradient are unchanged."""
    from torch.func import grad_and_value, vmap

    names = list(params)
    tensors = {k: p.detach() for k, p in params.items()}
    batch = {k: v for k, v in inputs.items() if k != "attention_mask"}

    def loss_one(weights, example):
        return loss_of.with_params(weights, {k: v.unsqueeze(0) for k, v in example.items()})

    with warnings.catch_warnings():  # a kernel without a batching rule runs per example: correct, slower
        warnings.filterwarnings("ignore", message="There is a performance drop")
        grads, losses = vmap(grad_and_value(loss_one), in_dims=(None, 0), randomness="different")(tensors, batch)
    norms = torch.sqrt(sum(grads[k].float().flatten(1).pow(2).sum(1) for k in names))
    scale = (clip / (norms + 1e-6)).clamp(max=1.0)  # Opacus' clip factor, per example
    sums = {k: torch.einsum("b,b...->...", scale, grads[k].float()) for k in names}
    return sums, losses.detach().float().mean(), int(losses.shape[0])


FELL_BACK: set[str] = set()  # owners that warned once that vmap failed on their model


def clipped_gradient_sum(params: dict[str, torch.nn.Parameter], inputs: dict, loss_of: Callable[[dict], torch.Tensor],
                         clip: float, vectorized: bool = True, owner: str = "dp_sgd") -> tuple[State, torch.Tensor, int]:
    """Σ_i clip(∇ℓ_i, C): vectorised where the loop offers the loss as a function of the
    tensors (`ModelLoss.with_params`) and the batch is right-padded, else one backward per example."""
    if vectorized and owner not in FELL_BACK and hasattr(loss_of, "with_params") and right_padded(inputs):
        try:
            return vectorized_clipped_sum(params, inputs, loss_of, clip)
        except RuntimeError as err:  # an op without a batching rule, data-dependent control flow
            FELL_BACK.add(owner)
            log.warning("%s: per-example gradients through torch.func failed on this model (%s); using one backward "
                        "per example", owner, str(err).splitlines()[0][:200])
    return looped_clipped_sum(params, inputs, loss_of, clip)


def require_per_example_pass(sums, owner: str) -> None:
    if sums is None:
        raise RuntimeError(
            f"{owner} computes per-example gradients through ClientHooks.backward, which this engine's "
            "local loop does not call: it needs the engine's per-example hook"
        )


class ClippedSums:
    """Σ of per-example clipped gradients over one optimizer step's micro-batches — over the
    whole client group's batch when the client is trained by a group (`ctx.group_sum`): each
    rank clips its own examples, and the group adds the sums, so every rank ends the step
    with the sum one rank would have computed on the group's G·b examples."""

    def __init__(self, params: dict[str, torch.nn.Parameter], clip: float, owner: str, vectorized: bool = True,
                 ctx: ClientContext | None = None):
        self.params, self.clip, self.owner, self.vectorized = params, clip, owner, vectorized
        self.group_sum = ctx.group_sum if ctx is not None else None
        self.leader = ctx.group_leader if ctx is not None else True
        self.sums, self.count = None, 0

    def add(self, inputs: dict, loss_of: Callable[[dict], torch.Tensor]) -> torch.Tensor:
        sums, loss, count = clipped_gradient_sum(self.params, inputs, loss_of, self.clip, self.vectorized, self.owner)
        self.sums = sums if self.sums is None else {k: self.sums[k] + sums[k] for k in sums}
        self.count += count
        return loss

    def take(self, noise: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[State, int]:
        """The step's sums and example count, over the client's group; starts the next step from
        zero. `noise(sum)`: a draw added to each sum once per step, whatever the group's size —
        by its leader alone, before the group adds the sums (the leader's draw, broadcast)."""
        require_per_example_pass(self.sums, self.owner)
        sums, count = self.sums, self.count
        self.sums, self.count = None, 0
        if noise is not None and self.leader:
            sums = {k: s + noise(s) for k, s in sums.items()}
        if self.group_sum is not None:
            counted = torch.tensor([float(count)], device=next(iter(sums.values())).device)
            self.group_sum([*sums.values(), counted])
            count = int(counted.item())
        return sums, count


def raw_gradients_refused(*args, **kwargs):
    raise ValueError(
        "dp_sgd: the wrapped strategy asks for raw gradients of the client's data (ClientContext.gradient "
        "or regrad), which would bypass per-example clipping and noise; wrap a strategy that does not"
    )


class PrivateGradient(DelegatingHooks):
    """Replaces each step's gradient by the clipped, noised mean of per-example gradients.
    In a client group every rank steps on the same noisy mean of the group's G·b examples."""

    sums_in_group = True

    def __init__(self, inner, clip: float, noise_multiplier: float, noise_seed: int, vectorized: bool = True):
        super().__init__(inner)
        self.clip, self.noise_multiplier, self.noise_seed = clip, noise_multiplier, noise_seed
        self.vectorized = vectorized

    def begin(self, params, ctx):
        self.clipped = ClippedSums(params, self.clip, "dp_sgd", self.vectorized, ctx)
        device = next(iter(params.values())).device if params else torch.device("cpu")
        self.generator = torch.Generator(device=device).manual_seed(self.noise_seed)
        super().begin(params, replace(ctx, gradient=raw_gradients_refused))

    def backward(self, inputs, loss_of, default):
        return self.clipped.add(inputs, loss_of)

    @torch.no_grad()
    def before_step(self, params, regrad):
        std = self.noise_multiplier * self.clip
        # one draw per step, N(0, σ²C²·I) on the sum of the whole (group) batch: drawn on every
        # rank, a group of G would add G draws (G times the noise with the same seed)
        sums, count = self.clipped.take(lambda s: torch.randn(s.shape, device=s.device, generator=self.generator) * std)
        for k, p in params.items():
            # count = examples per step, fixed (the local loop only draws full batches): the
            # normalisation by the expected batch size of the DP-SGD analysis
            p.grad = (sums[k] / count).to(p.dtype)
        super().before_step(params, raw_gradients_refused)  # e.g. FedProx's term: data-free, after the noise


def spending_fronts(rates: list[float], steps: list[int]) -> list[tuple[float, int]]:
    """The (rate, steps) pairs that may spend most: those no other client beats on both.

    Neither the highest rate nor the most steps alone picks the worst client: with
    `num_train_epochs` a client a little larger than another has a lower rate but can take
    one more step per round (sizes 16 and 17, batch 8: rates 0.5 and 0.47, 2 and 3 steps).
    So calibrate every pair that is not dominated (ε grows with rate and with steps) and keep
    the largest noise; as if each took part in every planned round."""
    pairs = set(zip(rates, steps))
    return sorted(p for p in pairs if not any(o != p and o[0] >= p[0] and o[1] >= p[1] for o in pairs))


@STRATEGIES.register("dp_sgd")
class LocalDPSGD(PrivacyWrapper):
    """Local DP-SGD (per-example clipping + Gaussian noise) on every client; ε per client."""

    clips_client_gradients = True  # client.max_grad_norm does not clip the noisy step again
    check_privacy = staticmethod(check_privacy)  # reads the recipe's privacy: section

    def __init__(
        self,
        inner: dict = {"name": "fedavg"},  # the strategy that aggregates the private updates
        max_grad_norm: float = 1.0,  # C, the per-example clipping norm; the budget is the privacy: section
        per_example: str = "vmap",  # "vmap": per-example gradients through torch.func; "loop": one backward each
    ):
        super().__init__(inner, "dp_sgd")
        self.per_example_in_groups = True  # a group sums its clipped gradients, then adds the noise once
        if "per_example" in self.inner.client_needs:  # its hooks run their own backward, which ours would replace
            raise RecipeError(f"dp_sgd: inner strategy '{inner['name']}' computes its own per-micro-batch gradients "
                              "(e.g. adversarial), which per-example clipping would silently replace: pick another inner strategy")
        if per_example not in ("vmap", "loop"):
            raise ValueError(f"dp_sgd: per_example must be 'vmap' or 'loop', got {per_example!r}")
        self.vectorized = self.uses_torch_func = per_example == "vmap"
        self.client_needs = self.client_needs | {"per_example"}  # every micro-batch's backward, example by example
        if max_grad_norm <= 0:
            raise ValueError("dp_sgd: max_grad_norm must be > 0")
        self.clip = max_grad_norm
        self.budget = Budget.of("dp_sgd")
        self.rates: list[float] = []
        self.steps: list[int] = []

    def setup(self, run) -> None:
        super().setup(run)
        self.budget = Budget.of("dp_sgd", run)
        self.rates = [min(1.0, run.batch_size / max(n, 1)) for n in run.client_sizes]
        self.steps = list(run.local_steps)
        if self.budget.target_epsilon is not None:
            self.budget.noise_multiplier = max(
                calibrate(lambda s: {Event(s, "poisson", rate=rate): steps * run.rounds},
                          self.budget.target_epsilon, self.budget.delta, self.budget.method)
                for rate, steps in spending_fronts(self.rates, self.steps)
            )

    def event(self, client: int, sigma: float) -> Event:
        return Event(sigma, "poisson", rate=self.rates[client])

    def init(self, global_state: State) -> State:
        self.budget.require_noise()
        return super().init(global_state)

    def client_hooks(self, round: int, client_id: int):
        # a fresh secret seed per local round (see the module docstring), or a reproducible one
        noise_seed = self.budget.noise_seed
        seed = secret_seed() if noise_seed is None else derive(noise_seed, round, client_id, tag="dp-sgd")
        return PrivateGradient(self.inner.client_hooks(round, client_id), self.clip, self.budget.require_noise(), seed,
                               self.vectorized)

    def ledgers(self, server_state: State) -> dict[int, Ledger]:
        own = split_state(server_state)[1]
        return {int(k[len(LEDGERS):]): Ledger(t) for k, t in own.items() if k.startswith(LEDGERS)}

    def aggregate(self, global_state: State, updates, server_state: State, info: RoundInfo):
        inner_state, _ = split_state(server_state)
        new_global, inner_state = self.inner.aggregate(global_state, updates, inner_state, info)
        ledgers = self.ledgers(server_state)
        if self.rates:  # without setup(run) the engine gave no client sizes: nothing to account
            for client in info.clients:
                ledger = ledgers.setdefault(client, Ledger())
                ledger.compose(self.event(client, self.budget.require_noise()), self.steps[client])
        return new_global, {**inner_state, **{f"{LEDGERS}{c}": ledger.state() for c, ledger in ledgers.items()}}

    def metrics(self, server_state: State) -> dict:
        return {**self.inner_metrics(server_state), **self.budget.report(list(self.ledgers(server_state).values()))}

    def stop_reason(self, round: int, server_state: State) -> str | None:
        if self.rates:
            ledgers = self.ledgers(server_state)
            sigma = self.budget.require_noise()
            worst = max(
                (ledgers.get(c, Ledger()).copy().compose(self.event(c, sigma), self.steps[c]).epsilon(self.budget.delta, self.budget.method)
                 for c in range(len(self.rates))),
                default=0.0,
            )
            reason = self.budget.stop_reason(round, worst)
            if reason:
                return reason
        return self.inner_stop_reason(round, server_state)

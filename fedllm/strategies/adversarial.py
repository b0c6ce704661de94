"""Federated adversarial training — Li, Song, Yang, "Federated Adversarial Learning: A
Framework with Convergence Analysis" (ICML 2023, arXiv 2208.03635): every client solves the
local min-max problem min_w E max_{‖δ‖≤ε} ℓ(w; x + δ, y) with an inner PGD ascent (their
Algorithm 1, local step: adversarial examples by PGD, then a gradient step on them); the
server aggregates as usual. Here it wraps ANY server strategy (`inner`), whose own client
hooks still run (FedProx's term, SCAFFOLD's correction act on the adversarial gradient).

For a language model the input is discrete, so the perturbation lives in the input
embedding space, as in FreeLB (Zhu et al., ICLR 2020, Algorithm 1), per example:

    δ₀ ~ U(−1, 1) · init/√(L·D)  on real tokens (L tokens, D dims; padding gets none)
    for t = 1..K:  g_t = ∇_δ ℓ(w; E(x) + δ_{t−1}, y)
                   δ_t = Π_{‖δ‖_F ≤ ε} (δ_{t−1} + α · g_t/‖g_t‖_F)

`gradient: freelb` (default) trains on the average of the parameter gradients of the K
forward passes at δ₀..δ_{K−1} (FreeLB's "free" accumulation, K+0 extra passes' worth of
backward); `gradient: pgd` trains on the gradient at δ_K alone (Madry's PGD-AT, the FAL
paper's local step: K ascent passes plus one training pass). The micro-batch's reported
loss is that of the trained-on perturbed inputs. Defaults: ε = `radius` 0.1 (Frobenius, per
example), K = `steps` 2, α = `step_size` ε/K, init 0.05 — within FreeLB's reported ranges
for fine-tuning (adv-lr 0.03–0.1, K 2–3, init 0–0.1); FAL's ℓ∞ pixel-space radius has no
direct analogue for embeddings. δ is added to the output of the model's input embedding
module inside its own forward (a forward hook), so an embedding sharded over a client
group (fsdp) is gathered there as for any forward.

Each example's δ₀ comes from its own generator, seeded by (round, client, micro-batch,
the example's place in the micro-batch), over its real tokens only: it does not depend on
how the batch is padded or split.

Deviations: ℓ2 (Frobenius) ball per example rather than FreeLB's optional ℓ∞; the ascent
is over one micro-batch (one `backward` call of the loop), so it needs a loop that hands
each micro-batch to the hooks (`per_example`: the built-in loop). Under gradient
accumulation each micro-batch's gradients are scaled by 1/accumulation like the loop's own.

In a client group (`federation.group_size` G > 1: G ranks train one client on a shared draw
of G·b examples, b each) a group step is one rank's step at batch G·b, to float rounding
(tests/strategies/test_adversarial_groups.py): rank r's share is examples r·b..r·b+b−1 of
the draw, so it draws their rows of δ₀; it weights its share's token-mean loss by G·n_r/N
(n_r label tokens in its share, N in the group's batch: one all-reduce of the counts), as
the loop weights its own, so the group's mean of the parameter gradients — FreeLB's K-pass
average or PGD's last pass, averaged by the loop like any gradient — is the whole batch's;
the weight scales each example's δ-gradient by a positive number, so its normalised ascent
step is one rank's; and the reported loss is weighted alike, so the group's mean is the
batch's. A share without a label token (its loss 0/0) runs the same passes on stand-in
labels scaled by 0, as the loop's default does.
"""
from __future__ import annotations

import math
from typing import Literal, Optional

import torch

from fedllm.registry import STRATEGIES, RecipeError
from fedllm.seeds import derive
from fedllm.strategies.base import ClientContext, DelegatingHooks, State, Strategy


def per_example_norm(t: torch.Tensor) -> torch.Tensor:
    """‖t_b‖_F for each example b, shaped to broadcast against t."""
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


class AdversarialHooks(DelegatingHooks):
    def __init__(self, inner, radius: float, steps: int, step_size: float, init: float, mode: str):
        super().__init__(inner)
        self.radius, self.steps, self.step_size, self.init, self.mode = radius, steps, step_size, init, mode

    def begin(self, params, ctx: ClientContext):
        self.embed, self.accumulate = ctx.embed(), ctx.accumulation
        self.round, self.client, self.micro_batch = ctx.round, ctx.client_id, 0
        self.group_sum, self.member = ctx.group_sum, ctx.group_member
        super().begin(params, ctx)

    def share_weight(self, labels: torch.Tensor) -> float:
        """G·n_r/N, the weight the loop gives this rank's token-mean loss (loops.builtin.GroupShare):
        n_r label tokens in its share, N in the group's batch; 1 alone."""
        if self.group_sum is None:
            return 1.0
        mine = (labels[:, 1:] != -100).sum().to(torch.float64)
        counts = torch.stack([mine, torch.ones_like(mine)])
        self.group_sum([counts])
        total, size = counts.tolist()
        return size * float(mine) / total if total else 1.0

    def start(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """δ₀ on the real tokens, each example from its own generator keyed by its place in the
        (group's) micro-batch: a rank's share gets the rows one rank with the whole batch draws."""
        real = mask[..., 0] > 0
        noise = []
        for row, tokens in enumerate(real.sum(1).tolist()):
            seed = derive(0, self.round, self.client, self.micro_batch, self.member * len(real) + row, tag="adversarial")
            draw = torch.rand((tokens, embeds.shape[-1]), generator=torch.Generator().manual_seed(seed)) * 2 - 1
            noise.append(draw * (self.init / math.sqrt(max(tokens, 1) * embeds.shape[-1])))  # init/√(L·D), per example
        delta = torch.zeros_like(embeds)
        delta[real] = torch.cat(noise).to(embeds.device, embeds.dtype)
        return delta

    def ascend(self, delta: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        delta = delta + self.step_size * grad / per_example_norm(grad)
        delta = delta * mask
        return delta * torch.clamp(self.radius / per_example_norm(delta), max=1.0)  # Π onto ‖δ‖_F ≤ ε

    def backward(self, inputs, loss_of, default):
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask", torch.ones_like(ids)).unsqueeze(-1)
        weight = self.share_weight(inputs["labels"])
        if weight == 0.0:  # no label token in this rank's share (its loss is 0/0): the same passes, on a
            inputs = {**inputs, "labels": torch.zeros_like(ids)}  # stand-in label, scaled by 0, as its group's other ranks run
        self.delta, losses = None, []
        for t in range(self.steps):
            loss = self.perturbed_loss(inputs, loss_of, mask) * weight
            delta = self.delta
            if self.mode == "freelb":  # every pass trains: parameter gradients averaged over the K passes
                (loss / (self.steps * self.accumulate)).backward()
                grad = delta.grad
                losses.append(loss.detach())
            else:  # pgd: the ascent passes only move δ
                (grad,) = torch.autograd.grad(loss, delta)
            # weighted: a positive scale per example (0 without labels), so the same normalised step
            self.delta = self.ascend(delta.detach(), grad.detach(), mask.to(delta.dtype)).requires_grad_(True)
        if self.mode == "pgd":
            loss = self.perturbed_loss(inputs, loss_of, mask) * weight
            (loss / self.accumulate).backward()
            losses = [loss.detach()]
        self.last_delta, self.delta = self.delta.detach(), None
        self.micro_batch += 1
        return torch.stack(losses).mean()  # weighted, as the loop's own: the group's mean is the batch's loss

    def perturbed_loss(self, inputs: dict, loss_of, mask: torch.Tensor) -> torch.Tensor:
        """loss_of(inputs) with δ added to the input embeddings inside the model's own forward,
        where a sharded embedding (FSDP, ZeRO-3) is gathered; δ₀ is drawn at the first pass."""
        def add(module, args, embeds):
            if self.delta is None:
                self.delta = self.start(embeds, mask.to(embeds.dtype)).requires_grad_(True)
            return embeds + self.delta

        handle = self.embed.register_forward_hook(add)
        try:
            return loss_of(inputs)
        finally:
            handle.remove()


@STRATEGIES.register("adversarial")
class Adversarial(Strategy):
    """Federated adversarial training (Li, Song, Yang): clients train on PGD perturbations of
    the input embeddings (FreeLB-style) around any inner strategy."""

    per_example_in_groups = True  # its backward weights its share's loss as the loop's does (module docstring)

    def __init__(self, inner: dict = {"name": "fedavg"}, radius: float = 0.1, steps: int = 2,
                 step_size: Optional[float] = None, init: float = 0.05, gradient: Literal["freelb", "pgd"] = "freelb"):
        if radius <= 0 or steps < 1 or init < 0 or (step_size is not None and step_size <= 0):
            raise RecipeError("adversarial: radius and step_size must be > 0, steps ≥ 1, init ≥ 0")
        self.inner = STRATEGIES.build(inner, "strategy.inner")
        if self.inner.clips_client_gradients:
            raise RecipeError(f"adversarial: inner strategy '{inner['name']}' runs its own per-example backward, "
                              "which would replace the adversarial one: use a non-DP inner strategy")
        self.radius, self.steps, self.init_scale, self.mode = radius, steps, init, gradient
        self.step_size = step_size if step_size is not None else radius / steps
        inner_ = self.inner
        self.needs, self.uniform_weights, self.counts_in_extras = inner_.needs, inner_.uniform_weights, inner_.counts_in_extras
        self.client_needs = inner_.client_needs | {"per_example"}  # the loop hands each micro-batch to `backward`

    def client_hooks(self, round: int, client_id: int):
        return AdversarialHooks(self.inner.client_hooks(round, client_id), self.radius, self.steps, self.step_size,
                                self.init_scale, self.mode)

    # ---- the server side is the inner strategy's -----------------------------------------
    def extras_like(self, global_state: State) -> State:
        return self.inner.extras_like(global_state)

    def check_federation(self, clients_per_round: int) -> None:
        self.inner.check_federation(clients_per_round)

    def setup(self, run) -> None:
        self.inner.setup(run)

    def init(self, global_state: State) -> State:
        return self.inner.init(global_state)

    def broadcast(self, server_state: State) -> State:
        return self.inner.broadcast(server_state)

    def aggregate(self, global_state: State, updates, server_state: State, info):
        return self.inner.aggregate(global_state, updates, server_state, info)

    def metrics(self, server_state: State) -> dict:
        return self.inner.metrics(server_state)

    def stop_reason(self, round: int, server_state: State) -> str | None:
        return self.inner.stop_reason(round, server_state)

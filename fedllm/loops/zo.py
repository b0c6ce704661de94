"""`client.optim: zo` — zeroth-order local training (MeZO: Malladi et al., NeurIPS 2023,
arXiv 2305.17333, Algorithm 1) with the update sent as (seed, scalar) pairs (FedKSeed: Qin
et al., ICML 2024, arXiv 2312.06353, §3).

Each local step draws a direction z from a seed s and estimates the directional derivative
with two forward passes on the step's batch B (SPSA, MeZO Eq. 1):

    g = (L(θ + εz; B) − L(θ − εz; B)) / (2ε),     θ ← θ − η·g·z

No backward pass, no optimizer state: a client needs inference memory plus the trainable
tensors. Because θ_K − θ_0 = Σ_k c_k z_k with c_k = −η g_k, the upload is K pairs
(s_k, c_k) — 12 bytes a step whatever the adapter's size — and the server regenerates each
z_k from its seed. The client accumulates its update D = Σ c_k z_k with exactly the
arithmetic the server's `reconstruct` uses (fp32, CPU, the same order), and trains at
θ = x^t + D, so what the server rebuilds IS the client's update, bit for bit.

Directions, the shared arithmetic and the pairs' wire form are fedllm.codecs.seeded's (the
channel rebuilds a seeded upload without this loop): z(s) has unit-variance independent
coordinates, E[z zᵀ] = I, so E[g z] = ∇L exactly on a quadratic.

Defaults: ε = `client.zo_eps` 1e-3 (MeZO's), one direction per step (MeZO's n = 1), the
batch of a step is `per_device_train_batch_size × gradient_accumulation_steps` examples,
the model in eval mode (no dropout, so both passes see the same function). Deviations: no
weight decay (it would move θ off span{z_k}); client hooks that edit gradients cannot run
(there are none), so only strategies without client hooks pair with zo (checked at load).
FZooS (Shu et al., arXiv 2308.04077) is not implemented: its surrogate is a GP fitted to the
query trajectory, whose gradient informs directions the trajectory has explored. Here every
step queries a fresh seeded direction, so the posterior gradient along the next direction is
the prior's and the surrogate reduces to the two-point estimate; its adaptive correction
needs every client's surrogate in shared coordinates (random features over one common
subspace), which per-round seeds do not give. A faithful form needs a small shared seed pool
(FedKSeed's K candidates) — a different protocol, left out.
"""
from __future__ import annotations

import numpy as np
import torch

from fedllm.codecs.seeded import SeededDelta, add_scaled, direction
from fedllm.data import collate
from fedllm.seeds import derive
from fedllm.training import VARIABLE_STEPS, LocalJob, LocalLoop, LocalResult, StepDriver, micro_batches


def two_point(loss_at, z: dict[str, torch.Tensor], eps: float) -> float:
    """(L(θ + εz) − L(θ − εz)) / (2ε); `loss_at(z, s)` evaluates L at θ + s·z."""
    return (loss_at(z, eps) - loss_at(z, -eps)) / (2 * eps)


class ZOLoop(LocalLoop):
    """MeZO local steps on the trainable tensors; forward passes only."""

    name = "client.optim=zo"
    supports = frozenset({VARIABLE_STEPS})

    def train(self, job: LocalJob, driver: StepDriver) -> LocalResult:
        cfg, model, params, device = job.cfg, job.model, job.params, job.device
        shapes = {k: tuple(p.shape) for k, p in params.items()}
        x0 = {k: job.x_t[k].to(device) for k in params}
        total = {k: torch.zeros(s, dtype=torch.float32) for k, s in shapes.items()}
        words = derive(job.seed, tag="zo").generate_state(max(job.steps, 1), np.uint64)
        seeds = [int(w >> np.uint64(1)) for w in words[: job.steps]]  # 63 bits: int64 on the wire
        per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
        batches = micro_batches(job.examples, per_step, job.steps, np.random.default_rng(job.seed))
        was_training = model.training
        model.eval()
        coeffs, losses = [], []
        with torch.no_grad():
            for seed, batch in zip(seeds, batches):
                inputs = {k: v.to(device) for k, v in collate(batch, job.pad_token_id).items()}
                seen = []

                def loss_at(z: dict, scale: float) -> float:
                    self.place(params, x0, total, z, scale)
                    seen.append(float(model(**inputs).loss))
                    return seen[-1]

                z = direction(seed, shapes)
                g = two_point(loss_at, z, cfg.zo_eps)
                # a Python float of the fp32 scalar sent: client and server add the same number
                coeff = float(np.float32(-job.lr * g))
                add_scaled(total, z, coeff)
                del z
                coeffs.append(coeff)
                losses.append(sum(seen) / 2)  # the loss at θ, to O(ε²)
                driver.after_step()
            self.place(params, x0, total, None, 0.0)
        model.train(was_training)
        return LocalResult(
            update=SeededDelta(total, seeds, coeffs), num_samples=len(job.examples),
            train_loss=float(np.mean(losses)) if losses else float("nan"), steps=len(coeffs), optimizer_state=None,
        )

    def place(self, params, x0, total, z, scale: float) -> None:
        """θ = x^t + D (+ scale·z) in the trainable tensors, one tensor's temporaries at a time."""
        for k, p in params.items():
            value = x0[k].float() + total[k].to(p.device)
            if z is not None:
                value.add_(z[k].to(p.device), alpha=scale)
            p.copy_(value.to(p.dtype))
            del value

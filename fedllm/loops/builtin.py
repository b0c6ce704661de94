"""The built-in local loop: K optimizer steps from x^t with gradient accumulation, mixed
precision and the strategy hooks on every micro-batch and step."""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from fedllm.data import collate
from fedllm.distributed import ClientGroup, all_reduce_sum_, group_mean_
from fedllm.training import (
    FULL_GRADIENT, GROUP, PER_EXAMPLE, REGRAD, VARIABLE_STEPS, DeltaView, LocalJob, LocalLoop, LocalResult, ModelLoss, StepDriver,
    load_optimizer_state, make_optimizer, micro_batches, optimizer_state_to_tensors,
)


class BuiltinLoop(LocalLoop):
    name = "client.trainer=builtin"
    supports = frozenset({PER_EXAMPLE, REGRAD, FULL_GRADIENT, VARIABLE_STEPS, GROUP})

    def __init__(self):
        self._compiled: tuple[torch.nn.Module, torch.nn.Module] | None = None

    def compiled(self, model: torch.nn.Module) -> torch.nn.Module:
        """`model` under torch.compile, made once: the resident model's parameters are updated in
        place between clients, so one compiled graph serves every client of every round."""
        if self._compiled is None or self._compiled[0] is not model:
            self._compiled = (model, torch.compile(model))
        return self._compiled[1]

    def train(self, job: LocalJob, driver: StepDriver) -> LocalResult:
        """Trains `job.params` (already holding x^t) on `job.examples`; returns Δ and the loss."""
        cfg, model, params, device = job.cfg, job.model, job.params, job.device
        torch.manual_seed(job.seed)  # dropout and anything else stochastic in the forward pass
        rng = np.random.default_rng(job.seed)
        optimizer = make_optimizer(cfg, list(params.values()), job.lr)
        if job.optimizer_state:
            load_optimizer_state(optimizer, job.optimizer_state)
        precision = torch.bfloat16 if cfg.bf16 else torch.float16 if cfg.fp16 else None
        autocast = torch.autocast(device.type, dtype=precision) if precision else contextlib.nullcontext()
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.fp16)

        if not model.training:  # walking every module costs per client, and the mode rarely changes
            model.train()
        accumulate = cfg.gradient_accumulation_steps
        count = job.steps * accumulate
        loss_of = ModelLoss(model, autocast)
        forward = self.compiled(model) if cfg.torch_compile else model
        losses = []
        group = GroupShare(job.group, params, device)
        for i, group_batch in enumerate(micro_batches(job.examples, group.batch_size(cfg), count, rng)):
            batch, weight = group.share(group_batch)
            inputs = {k: v.to(device) for k, v in collate(batch, job.pad_token_id).items()}

            def backward():
                with autocast:
                    out = forward(**inputs)
                loss = out.loss
                if weight == 0.0:  # no label token in this rank's share (its loss is 0/0): it adds nothing,
                    (out.logits.float().sum() * 0.0).backward()  # yet runs a backward as its group's other ranks do
                    return torch.zeros((), device=device)
                scaler.scale(loss * weight / accumulate).backward()
                return loss.detach() * weight

            def regrad():
                if accumulate != 1 or cfg.fp16:
                    raise ValueError(
                        "this strategy recomputes gradients within a step: set client.gradient_accumulation_steps=1 "
                        "and use bf16 rather than fp16 (no loss scaling)"
                    )
                optimizer.zero_grad(set_to_none=True)
                backward()
                group.average_gradients()

            losses.append(driver.backward(inputs, loss_of, backward))
            if (i + 1) % accumulate == 0:
                if not driver.hooks.sums_in_group:  # per-example DP sums its clipped gradients over the group itself
                    group.average_gradients()
                if cfg.fp16 and all(p.grad is None for p in params.values()):
                    raise ValueError("the strategy's hooks compute their own gradients, without fp16 loss scaling: use client.bf16")
                scaler.unscale_(optimizer)

                def optimizer_step():
                    scaler.step(optimizer)
                    scaler.update()

                driver.step(optimizer_step, lambda: optimizer.zero_grad(set_to_none=True), regrad)

        return LocalResult(
            update=DeltaView(params, job.x_t),
            num_samples=len(job.examples),
            train_loss=group.mean_loss(losses),
            steps=count // accumulate,
            optimizer_state=optimizer_state_to_tensors(optimizer) if cfg.keep_optimizer_state else None,
        )


class GroupShare:
    """One client trained by a client group of G ranks, data parallel (federation.group_size):
    every rank draws the group's micro-batch of G·b examples (the same seed, so the same draw),
    keeps its b, and the gradients of the trainable tensors are averaged in the group before
    each optimizer step, so every rank steps identically and ends with the same adapter.

    A plain all-reduce of the adapter's gradients rather than wrapping the model in DDP: it is
    what DDP computes (a mean over the group), the model and the adapter code stay untouched,
    and an adapter's gradients are too small for DDP's overlap with the backward to matter.
    Exactness: a rank's token-mean loss is weighted by G·n_r/N (n_r its label tokens, N the
    group batch's, both known on every rank from the shared draw), so the group mean of the
    gradients is the gradient of the token mean over the whole G·b batch — one rank training
    with batch G·b, up to float rounding. G = 1: weight 1, no collective."""

    def __init__(self, group: ClientGroup | None, params: dict[str, torch.nn.Parameter], device: torch.device):
        self.group = group if group is not None and group.size > 1 else None
        self.params, self.device = params, device

    def batch_size(self, cfg) -> int:
        return cfg.per_device_train_batch_size * (self.group.size if self.group else 1)

    def share(self, batch: list[dict]) -> tuple[list[dict], float]:
        """This rank's part of the group's micro-batch, and the weight of its mean loss."""
        if self.group is None:
            return batch, 1.0
        size, member = self.group.size, self.group.member
        part = len(batch) // size
        tokens = [label_tokens(e) for e in batch]
        mine = slice(member * part, (member + 1) * part)
        total = sum(tokens)
        return batch[mine], (size * sum(tokens[mine]) / total if total else 1.0)

    def average_gradients(self) -> None:
        if self.group is None:
            return
        for p in self.params.values():  # a rank whose share had no label token has no gradient yet
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        group_mean_([p.grad for p in self.params.values()], self.group, self.device)

    def mean_loss(self, losses: list[torch.Tensor]) -> float:
        """The mean over micro-batches of the group batch's token-mean loss (the weighted shares' group mean)."""
        if not losses:
            return float("nan")
        if self.group is None:
            return torch.stack(losses).float().mean().item()
        per_batch = torch.stack(losses).double().cpu()
        all_reduce_sum_(per_batch, self.device, self.group.handle)
        return (per_batch / self.group.size).mean().item()


def label_tokens(example: dict) -> int:
    """The tokens a causal LM's loss averages over: labels other than -100, after the shift by one."""
    return int((torch.as_tensor(example["labels"][1:]) != -100).sum())

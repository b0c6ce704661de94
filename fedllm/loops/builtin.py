"""The built-in local loop: K optimizer steps from x^t with gradient accumulation, mixed
precision and the strategy hooks on every micro-batch and step."""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from fedllm.data import collate
from fedllm.training import (
    FULL_GRADIENT, PER_EXAMPLE, REGRAD, VARIABLE_STEPS, DeltaView, LocalJob, LocalLoop, LocalResult, ModelLoss, StepDriver,
    load_optimizer_state, make_optimizer, micro_batches, optimizer_state_to_tensors,
)


class BuiltinLoop(LocalLoop):
    name = "client.trainer=builtin"
    supports = frozenset({PER_EXAMPLE, REGRAD, FULL_GRADIENT, VARIABLE_STEPS})

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
        for i, batch in enumerate(micro_batches(job.examples, cfg.per_device_train_batch_size, count, rng)):
            inputs = {k: v.to(device) for k, v in collate(batch, job.pad_token_id).items()}

            def backward():
                with autocast:
                    loss = forward(**inputs).loss
                scaler.scale(loss / accumulate).backward()
                return loss.detach()

            def regrad():
                if accumulate != 1 or cfg.fp16:
                    raise ValueError(
                        "this strategy recomputes gradients within a step: set client.gradient_accumulation_steps=1 "
                        "and use bf16 rather than fp16 (no loss scaling)"
                    )
                optimizer.zero_grad(set_to_none=True)
                backward()

            losses.append(driver.backward(inputs, loss_of, backward))
            if (i + 1) % accumulate == 0:
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
            train_loss=torch.stack(losses).float().mean().item() if losses else float("nan"),
            steps=count // accumulate,
            optimizer_state=optimizer_state_to_tensors(optimizer) if cfg.keep_optimizer_state else None,
        )

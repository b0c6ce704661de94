"""One client's local round on the resident model: K optimizer steps from the global point,
strategy hooks on the gradient, the update Δ = x_i − x^t out."""
from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from fedllm.data import collate
from fedllm.strategies.base import ClientHooks, State


@dataclass
class LocalResult:
    update: State
    num_samples: int
    train_loss: float
    steps: int
    optimizer_state: State | None
    # bytes the local round itself exchanged with the server (split learning), counted on the wire
    split_bytes_up: int = 0
    split_bytes_down: int = 0


class DeltaView(Mapping):
    """Δ = x_i − x^t, computed tensor by tensor when read, so a full-parameter update is
    never held whole (Ferret projects it block by block; `dict(view)` materialises it).
    Valid while `params` hold the client's trained weights: until the next client loads."""

    def __init__(self, params: dict[str, torch.nn.Parameter], global_state: State):
        self.params, self.global_state = params, global_state

    @torch.no_grad()
    def __getitem__(self, name: str) -> torch.Tensor:
        p = self.params[name]
        return p.detach().float() - self.global_state[name].to(p.device).float()

    def __iter__(self):
        return iter(self.params)

    def __len__(self) -> int:
        return len(self.params)


def client_seed(seed: int, round: int, client_id: int) -> int:
    """Every random choice of a local round derives from (seed, round, client): the same on
    any rank, in any order, and after a resume."""
    return int(np.random.SeedSequence([seed, round, client_id]).generate_state(1, np.uint64)[0] >> 1)


def round_learning_rate(cfg, round: int, rounds: int) -> float:
    """Learning rate of round `round` (0-based): warm-up, then constant or cosine across rounds."""
    warmup = int(cfg.warmup_ratio * rounds)
    if round < warmup:
        return cfg.learning_rate * (round + 1) / (warmup + 1)
    if cfg.lr_scheduler_type == "constant":
        return cfg.learning_rate
    progress = (round - warmup) / max(1, rounds - warmup - 1)
    return cfg.min_learning_rate + 0.5 * (cfg.learning_rate - cfg.min_learning_rate) * (1 + math.cos(math.pi * progress))


def num_micro_batches(cfg, num_examples: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps * cfg.gradient_accumulation_steps
    per_epoch = math.ceil(num_examples / cfg.per_device_train_batch_size)
    steps = math.ceil(cfg.num_train_epochs * per_epoch / cfg.gradient_accumulation_steps)
    return steps * cfg.gradient_accumulation_steps


def micro_batches(examples: list[dict], batch_size: int, count: int, rng: np.random.Generator):
    """`count` batches drawn epoch by epoch from fresh permutations of the client's data."""
    order = np.empty(0, dtype=np.int64)
    for _ in range(count):
        if len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(len(examples))])
        picked, order = order[:batch_size], order[batch_size:]
        yield [examples[i] for i in picked]


def make_optimizer(cfg, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if cfg.optim == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)


def optimizer_state_to_tensors(optimizer: torch.optim.Optimizer) -> State:
    flat = {}
    for index, slots in optimizer.state_dict()["state"].items():
        for key, value in slots.items():
            flat[f"{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return flat


def load_optimizer_state(optimizer: torch.optim.Optimizer, flat: State) -> None:
    state: dict[int, dict] = {}
    for name, tensor in flat.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = tensor
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def mean_gradient(model, params: dict[str, torch.nn.Parameter], examples: list[dict], batch_size: int, pad_token_id: int, device) -> State:
    """∇ of the mean loss over `examples` at the current parameters (grads left cleared)."""
    for p in params.values():
        p.grad = None
    model.train()
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        inputs = {k: v.to(device) for k, v in collate(batch, pad_token_id).items()}
        (model(**inputs).loss * (len(batch) / len(examples))).backward()
    grads = {k: p.grad.detach().float().clone() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
    for p in params.values():
        p.grad = None
    return grads


def local_round(
    model: torch.nn.Module,
    params: dict[str, torch.nn.Parameter],
    global_state: State,
    examples: list[dict],
    cfg,
    *,
    lr: float,
    seed: int,
    pad_token_id: int,
    device: torch.device,
    hooks: ClientHooks | None = None,
    optimizer_state: State | None = None,
    steps: int | None = None,
    on_step=None,
) -> LocalResult:
    """Trains `params` (already holding x^t) on `examples`; returns Δ and the loss.
    `hooks` have already seen `begin`; the loop calls their `backward` and `before_step`."""
    torch.manual_seed(seed)  # dropout and anything else stochastic in the forward pass
    rng = np.random.default_rng(seed)
    optimizer = make_optimizer(cfg, list(params.values()), lr)
    if optimizer_state:
        load_optimizer_state(optimizer, optimizer_state)
    hooks = hooks or ClientHooks()
    precision = torch.bfloat16 if cfg.bf16 else torch.float16 if cfg.fp16 else None
    autocast = torch.autocast(device.type, dtype=precision) if precision else contextlib.nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.fp16)

    if not model.training:  # walking every module costs per client, and the mode rarely changes
        model.train()
    accumulate = cfg.gradient_accumulation_steps
    count = num_micro_batches(cfg, len(examples)) if steps is None else steps * accumulate
    losses = []
    for i, batch in enumerate(micro_batches(examples, cfg.per_device_train_batch_size, count, rng)):
        inputs = {k: v.to(device) for k, v in collate(batch, pad_token_id).items()}

        def backward():
            with autocast:
                loss = model(**inputs).loss
            scaler.scale(loss / accumulate).backward()
            return loss.detach()

        def loss_of(sub_batch: dict) -> torch.Tensor:
            with autocast:
                return model(**sub_batch).loss

        def regrad():
            if accumulate != 1 or cfg.fp16:
                raise ValueError(
                    "this strategy recomputes gradients within a step: set client.gradient_accumulation_steps=1 "
                    "and use bf16 rather than fp16 (no loss scaling)"
                )
            optimizer.zero_grad(set_to_none=True)
            backward()

        losses.append(hooks.backward(inputs, loss_of, backward))
        if (i + 1) % accumulate == 0:
            if cfg.fp16 and all(p.grad is None for p in params.values()):
                raise ValueError("the strategy's hooks compute their own gradients, without fp16 loss scaling: use client.bf16")
            scaler.unscale_(optimizer)
            hooks.before_step(params, regrad)
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params.values(), cfg.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if on_step is not None:
                on_step()

    return LocalResult(
        update=DeltaView(params, global_state),
        num_samples=len(examples),
        train_loss=torch.stack(losses).float().mean().item() if losses else float("nan"),
        steps=count // accumulate,
        optimizer_state=optimizer_state_to_tensors(optimizer) if cfg.keep_optimizer_state else None,
    )

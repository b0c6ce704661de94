"""The local-training contract shared by every local loop (built-in, Hugging Face Trainer,
SFPrompt's split loop, the quadratic harness in the tests): what a loop is asked to do
(`LocalJob`), what it returns (`LocalResult`), what it declares it supports, and the one
place the strategy hooks meet the optimizer step (`StepDriver`). Only `fedllm.client.Client`
drives the hooks' `num_steps → begin → … → finish`; a loop only trains."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from fedllm.data import collate
from fedllm.distributed import ClientGroup
from fedllm.seeds import derive
from fedllm.state import State
from fedllm.strategies.base import ClientHooks

# What a loop can do for a strategy's client hooks (ClientHooks.needs names these):
PER_EXAMPLE = "per_example"  # calls hooks.backward per micro-batch (DP-SGD's per-example clipping)
REGRAD = "regrad"  # can recompute the last micro-batch's gradients inside a step (FedSpeed, FedAMD)
FULL_GRADIENT = "full_gradient"  # ∇ of the mean loss over the client's data at x^t (FedAMD's anchors)
VARIABLE_STEPS = "variable_steps"  # trains the number of steps the hooks ask for (0 included)
GROUP = "group"  # trains one client on a client group of ranks (federation.group_size > 1)
CAPABILITIES = {
    PER_EXAMPLE: "per-micro-batch backward hooks (per-example gradients)",
    REGRAD: "recomputing a micro-batch's gradients within a step",
    FULL_GRADIENT: "the client's full-data gradient at x^t",
    VARIABLE_STEPS: "a number of local steps chosen by the strategy",
    GROUP: "training one client on a group of ranks (federation.group_size > 1)",
}


def lacking(needs: frozenset[str], supports: frozenset[str]) -> str | None:
    """What of `needs` a loop's `supports` lacks, in words (None: nothing)."""
    missing = sorted(needs - supports)
    return "; ".join(f"{CAPABILITIES[m]} ({m})" for m in missing) or None


@dataclass
class LocalResult:
    update: State | Mapping  # Δ = x_i − x^t (a DeltaView where the loop trains the params in place)
    num_samples: int
    train_loss: float
    steps: int
    optimizer_state: State | None
    # bytes the local round itself exchanged with the server (split learning), counted on the wire
    split_bytes_up: int = 0
    split_bytes_down: int = 0


@dataclass
class LocalJob:
    """One local round as a loop receives it: the resident model already holds x^t."""

    model: torch.nn.Module
    params: dict[str, torch.nn.Parameter]
    x_t: State
    examples: list[dict]
    cfg: object  # the recipe's client: section (ClientConfig)
    lr: float
    seed: int  # every random choice of the round derives from it
    steps: int  # optimizer steps the hooks asked for
    optimizer_state: State | None
    pad_token_id: int
    device: torch.device
    round: int
    client_id: int
    group: ClientGroup | None = None  # the ranks training this client together (None: this rank alone)


class LocalLoop:
    """A local training loop: trains `job.params` from x^t and reports Δ. It calls
    `driver.backward` for each micro-batch where it can and `driver.step` (or its two
    halves) for each optimizer step, and declares what it supports (CAPABILITIES)."""

    name = "loop"
    supports: frozenset[str] = frozenset()

    def train(self, job: LocalJob, driver: "StepDriver") -> LocalResult:
        raise NotImplementedError

    def full_gradient(self, job: LocalJob, limit: int | None) -> State:
        """∇ of the mean loss on the first `limit` local examples (all: None) at x^t."""
        return mean_gradient(job.model, job.params, job.examples[:limit], job.cfg.per_device_train_batch_size,
                             job.pad_token_id, job.device)


def no_regrad() -> None:
    raise ValueError("this local loop cannot recompute gradients within a step (regrad)")


class StepDriver:
    """The one step order of every loop: strategy hooks → clipping → optimizer step →
    zero_grad → progress. A loop that owns its optimizer calls `step`; one that does not
    (a Trainer) calls `before_optimizer` and `after_step` around the Trainer's own step."""

    def __init__(self, hooks: ClientHooks, params: dict[str, torch.nn.Parameter], max_grad_norm: float | None,
                 on_step: Callable[[], None] | None = None):
        self.hooks, self.params, self.max_grad_norm, self.on_step = hooks, params, max_grad_norm, on_step

    def backward(self, inputs: dict, loss_of: Callable[[dict], torch.Tensor], default: Callable[[], torch.Tensor]) -> torch.Tensor:
        return self.hooks.backward(inputs, loss_of, default)

    def before_optimizer(self, regrad: Callable[[], None] = no_regrad) -> None:
        self.hooks.before_step(self.params, regrad)
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params.values(), self.max_grad_norm)

    def after_step(self) -> None:
        if self.on_step is not None:
            self.on_step()

    def step(self, optimizer_step: Callable[[], None], zero_grad: Callable[[], None], regrad: Callable[[], None] = no_regrad) -> None:
        self.before_optimizer(regrad)
        optimizer_step()
        zero_grad()
        self.after_step()


class ModelLoss:
    """`loss_of(sub_batch)`: the model's mean loss on any slice of a micro-batch (hooks'
    backward). `with_params(tensors, sub_batch)` is the same loss as a pure function of the
    trainable tensors (torch.func.functional_call), so a hook can take per-example
    gradients with vmap(grad(...)) instead of a Python loop over examples."""

    def __init__(self, model: torch.nn.Module, autocast):
        self.model, self.autocast = model, autocast

    def __call__(self, sub_batch: dict) -> torch.Tensor:
        with self.autocast:
            return self.model(**sub_batch).loss

    def with_params(self, tensors: State, sub_batch: dict) -> torch.Tensor:
        from torch.func import functional_call

        with self.autocast:
            return functional_call(self.model, tensors, args=(), kwargs=sub_batch).loss


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
    return derive(seed, round, client_id, tag="client")


def round_learning_rate(cfg, round: int, rounds: int) -> float:
    """Learning rate of round `round` (0-based): warm-up, then constant or cosine across rounds."""
    warmup = int(cfg.warmup_ratio * rounds)
    if round < warmup:
        return cfg.learning_rate * (round + 1) / (warmup + 1)
    if cfg.lr_scheduler_type == "constant":
        return cfg.learning_rate
    progress = (round - warmup) / max(1, rounds - warmup - 1)
    return cfg.min_learning_rate + 0.5 * (cfg.learning_rate - cfg.min_learning_rate) * (1 + math.cos(math.pi * progress))


def num_micro_batches(cfg, num_examples: int, group_size: int = 1) -> int:
    """Micro-batches of a local round; a client group's micro-batch is group_size × the per-device batch."""
    if cfg.max_steps is not None:
        return cfg.max_steps * cfg.gradient_accumulation_steps
    per_epoch = math.ceil(num_examples / (cfg.per_device_train_batch_size * group_size))
    steps = math.ceil(cfg.num_train_epochs * per_epoch / cfg.gradient_accumulation_steps)
    return steps * cfg.gradient_accumulation_steps


def default_steps(cfg, num_examples: int, group_size: int = 1) -> int:
    """Optimizer steps of a local round before the strategy's hooks adjust them."""
    return num_micro_batches(cfg, num_examples, group_size) // cfg.gradient_accumulation_steps


def batch_draws(num_examples: int, batch_size: int, count: int, rng: np.random.Generator):
    """The example indices of `count` batches, drawn epoch by epoch from fresh permutations."""
    order = np.empty(0, dtype=np.int64)
    for _ in range(count):
        if len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(num_examples)])
        picked, order = order[:batch_size], order[batch_size:]
        yield picked


def micro_batches(examples: list[dict], batch_size: int, count: int, rng: np.random.Generator):
    """`count` batches drawn epoch by epoch from fresh permutations of the client's data."""
    for picked in batch_draws(len(examples), batch_size, count, rng):
        yield [examples[i] for i in picked]


def example_lengths(examples) -> np.ndarray:
    """Tokens per example (packed examples know them without building a single example)."""
    if hasattr(examples, "lengths"):
        return examples.lengths
    return np.array([len(e["input_ids"]) for e in examples], dtype=np.int64)


def padded_tokens(lengths: np.ndarray, batch_size: int, count: int, seed: int) -> int:
    """Token positions (padding included: collate pads to the batch's longest) of the `count`
    batches the built-in loop draws with `seed`: the compute a local round costs."""
    rng = np.random.default_rng(seed)
    return sum(int(lengths[picked].max()) * len(picked) for picked in batch_draws(len(lengths), batch_size, count, rng))


def make_optimizer(cfg, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if cfg.optim == "sgd":
        kind, options = torch.optim.SGD, {"lr": lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay}
    else:
        kind, options = torch.optim.AdamW, {"lr": lr, "weight_decay": cfg.weight_decay}
    if cfg.fused_optimizer:
        try:  # one kernel over all tensors; torch refuses at construction where the device or dtype has none
            return kind(params, fused=True, **options)
        except (RuntimeError, ValueError):
            pass
    return kind(params, **options)


def optimizer_state_to_tensors(optimizer: torch.optim.Optimizer) -> State:
    flat = {}
    for index, slots in optimizer.state_dict()["state"].items():
        for key, value in slots.items():
            flat[f"{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return flat


def load_optimizer_state(optimizer: torch.optim.Optimizer, flat: State) -> None:
    """A copy of `flat` as the optimizer's state: its steps update the copy in place, never the
    client's stored record (on the CPU torch would alias the tensors), so a client whose upload
    is rejected keeps the moments it had."""
    state: dict[int, dict] = {}
    for name, tensor in flat.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = tensor.clone()
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

"""Client: one party's local round on the resident model, and the ONLY driver of a
strategy's ClientHooks — `num_steps → begin → (the loop's backward / step) → finish` —
whatever loop trains (built-in, a Hugging Face Trainer, SFPrompt's split loop)."""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Callable

import torch

from fedllm.adapters.base import Adapter
from fedllm.distributed import ClientGroup, group_sum_
from fedllm.recipe import ClientConfig
from fedllm.state import ClientRecord, State
from fedllm.strategies.base import ClientContext, ClientHooks, Strategy
from fedllm.training import (
    FULL_GRADIENT, LocalJob, LocalLoop, LocalResult, StepDriver, client_seed, default_steps, example_lengths, num_micro_batches,
    padded_tokens,
)

DEFAULT_CLIP = ClientConfig.model_fields["max_grad_norm"].default  # the client: section's, unless set
log = logging.getLogger("fedllm")


def post_step_clip(strategy: Strategy, max_grad_norm: float | None) -> float | None:
    """The norm the step driver clips each step's gradient to after the strategy's hooks:
    none for a strategy that clips per example itself. DP-SGD steps on the noisy mean of the
    clipped per-example gradients as it is (Abadi et al. 2016, Algorithm 1); clipping that
    again would scale every noisy step down to `max_grad_norm` — another algorithm."""
    if not strategy.clips_client_gradients:
        return max_grad_norm
    if max_grad_norm not in (None, DEFAULT_CLIP):  # set in the recipe, not the default
        log.warning("client.max_grad_norm=%s is ignored: the strategy clips each example's gradient itself, "
                    "and clipping its noisy step again would shrink it (no longer DP-SGD)", max_grad_norm)
    return None


@dataclass
class Upload:
    """What a client hands to the channel after its round."""

    update: Mapping  # Δ (a lazy DeltaView unless a hook rewrites it)
    extras: State  # the strategy's extra tensors for the server (unprefixed)
    weight: float  # its weight in the mean: sample count, or 1 for uniform strategies
    record: ClientRecord  # the client's new stored record (kept only if the server accepts the update)
    result: LocalResult  # loss, steps, samples, bytes the loop itself exchanged


class Client:
    """Trains one client at a time on the ONE resident model. `data[client_id]` is that
    client's tokenized examples; `seed` the recipe seed every local seed derives from."""

    def __init__(self, model: torch.nn.Module, params: dict[str, torch.nn.Parameter], adapter: Adapter,
                 strategy: Strategy, loop: LocalLoop, cfg, data: Sequence[list[dict]], pad_token_id: int,
                 device: torch.device, seed: int, group: ClientGroup | None = None):
        self.group = group  # the client group this rank trains each client with (fedllm.distributed)
        self.model, self.params, self.adapter, self.strategy, self.loop = model, params, adapter, strategy, loop
        self.cfg, self.data, self.pad_token_id, self.device, self.seed = cfg, data, pad_token_id, device, seed
        self.max_grad_norm = post_step_clip(strategy, cfg.max_grad_norm)  # None under DP-SGD: see there

    def group_fields(self) -> dict:
        """ClientContext's group_sum, group_leader and group_member for this rank's client group."""
        if self.group is None or self.group.size == 1:
            return {}
        return {"group_sum": lambda tensors: group_sum_(tensors, self.group, self.device),
                "group_leader": self.group.leader, "group_member": self.group.member}

    def planned_tokens(self, client_id: int, round: int) -> int:
        """The padded tokens of the client's local round as the built-in loop draws its batches
        (at the step count before a strategy's hooks adjust it): the cost the round's split
        over the client groups evens out."""
        examples = self.data[client_id]
        if len(examples) == 0:
            return 0
        size = self.group.size if self.group is not None else 1
        return padded_tokens(example_lengths(examples), self.cfg.per_device_train_batch_size * size,
                             num_micro_batches(self.cfg, len(examples), size), client_seed(self.seed, round, client_id))

    def run(self, client_id: int, round: int, x_t: State, broadcast: State, record: ClientRecord, lr: float,
            on_step: Callable[[], None] | None = None) -> Upload:
        self.adapter.load(self.model, x_t, self.params)
        self.adapter.prepare_local_round(self.model)
        x_t = self.adapter.for_client(self.model, self.params, x_t, client_id)
        examples = self.data[client_id]
        hooks = self.hooks(client_id, round)
        job = LocalJob(
            self.model, self.params, x_t, examples, self.cfg, lr, client_seed(self.seed, round, client_id),
            hooks.num_steps(default_steps(self.cfg, len(examples), self.group.size if self.group is not None else 1)),
            record.optimizer if self.cfg.keep_optimizer_state else None, self.pad_token_id, self.device, round, client_id,
            self.group,
        )
        gradient = (lambda limit=None: self.loop.full_gradient(job, limit)) if FULL_GRADIENT in self.loop.supports else None
        embed = lambda: self.model.get_input_embeddings()  # noqa: E731  (a Hugging Face model's)
        local = self.begin(hooks, ClientContext(round, client_id, x_t, broadcast, record.strategy, lr, job.steps, gradient,
                                                embed, self.cfg.gradient_accumulation_steps, **self.group_fields()), on_step)
        result = self.loop.train(job, local.driver)
        update, extras, client_state = self.finish(local, result.update)
        weight = 1.0 if self.strategy.uniform_weights else float(result.num_samples)
        new_record = ClientRecord(result.optimizer_state or {}, client_state or {}, record.codecs)
        return Upload(update, extras, weight, new_record, result)

    # ---- the two halves of a local round, for a loop that runs its own steps (the Trainer callback) ----
    def hooks(self, client_id: int, round: int) -> ClientHooks:
        return self.strategy.client_hooks(round, client_id) or ClientHooks()

    def begin(self, hooks: ClientHooks, ctx: ClientContext, on_step: Callable[[], None] | None = None) -> "LocalRound":
        """The strategy's hooks begin the round; the returned driver steps the loop (StepDriver)."""
        hooks.begin(self.params, ctx)
        return LocalRound(hooks, StepDriver(hooks, self.params, self.max_grad_norm, on_step))

    def finish(self, local: "LocalRound", update: Mapping) -> tuple[Mapping, State, State | None]:
        """The hooks end the round: (the update as they left it, the strategy's extras, the client's new strategy state)."""
        update = dict(update) if local.hooks.rewrites_update else update
        extras, client_state = local.hooks.finish(self.params, update)
        return update, extras, client_state


@dataclass
class LocalRound:
    """A client's round between `Client.begin` and `Client.finish`."""

    hooks: ClientHooks
    driver: StepDriver

"""SFPrompt — Cao et al., arXiv 2407.17533 (no official code): split federated prompt
tuning. The LLM is cut U-shaped (fedllm.adapters.sfprompt.split): the client holds the head (with
the soft prompt) and the tail (with the labels and the loss), the server one frozen body
shared by all clients. A client's round, in the paper's order:

1. EL2N pruning: score the local examples through the head→tail shortcut, keep the
   hardest `keep_ratio` of them (re-scored every `prune_every` rounds);
2. `local_loss_steps` prompt updates on the shortcut, no communication;
3. `split_steps` of split training: activations up, body output down, the gradient of the
   body output up, the gradient of the body input down — each one serialized for real
   with fedllm.wire and counted (the engine adds those bytes to the client's ledger);
4. the engine averages prompts (and enabled tail tensors) with the recipe's strategy.

The adapter brings its own local loop (`SplitLoop`, via `local_loop()`); the engine's Client
drives the strategy hooks around it as around any loop.
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
from safetensors.torch import save_file
from transformers.modeling_outputs import CausalLMOutput

from fedllm.adapters.base import Adapter, quiet_peft
from fedllm.adapters.sfprompt.split import SplitLM, causal_lm_loss, el2n_scores, token_logits
from fedllm.data import collate
from fedllm.registry import ADAPTERS, RecipeError
from fedllm.training import LocalJob, LocalLoop, LocalResult, StepDriver, make_optimizer, micro_batches
from fedllm.wire import Message, deserialize, serialize

SPLIT_CONFIG = "sfprompt_split.json"
TAIL_FILE = "sfprompt_tail.safetensors"


class PromptedLM(torch.nn.Module):
    """The resident model as SFPrompt sees it: the base LM plus the soft prompt. Its own
    forward is head→body→tail in one process (evaluation), with the prompt positions
    dropped from the logits so that they line up with the tokens."""

    def __init__(self, base: torch.nn.Module, prompt: torch.Tensor, head_layers: int, tail_layers: int):
        super().__init__()
        self.base = base
        self.prompt = torch.nn.Parameter(prompt)
        self.split = SplitLM(base, head_layers, tail_layers)

    def forward(self, input_ids, attention_mask=None, labels=None, **_):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        logits = token_logits(self.split.forward(input_ids, attention_mask, self.prompt), len(self.prompt))
        return CausalLMOutput(loss=None if labels is None else causal_lm_loss(logits, labels), logits=logits)


class Cut:
    """The client↔server boundary: every tensor crossing it is serialized, deserialized
    on the other side (no autograd graph survives the trip) and its bytes counted."""

    def __init__(self):
        self.bytes_up = self.bytes_down = 0

    def up(self, **tensors) -> dict[str, torch.Tensor]:
        wire = serialize(Message(tensors))
        self.bytes_up += len(wire)
        return deserialize(wire).tensors

    def down(self, **tensors) -> dict[str, torch.Tensor]:
        wire = serialize(Message(tensors))
        self.bytes_down += len(wire)
        return deserialize(wire).tensors


@dataclass
class SplitResult(LocalResult):
    split_bytes_up: int = 0  # activations + body-output gradients, client → server
    split_bytes_down: int = 0  # body outputs + body-input gradients, server → client


def kept_count(keep_ratio: float, n: int) -> int:
    return min(n, max(1, math.floor(keep_ratio * n + 0.5)))  # round half up, at least one example


@ADAPTERS.register("sfprompt")
class SFPrompt(Adapter):
    """SFPrompt: split federated prompt tuning — soft prompt on a client head/tail around a
    frozen server body; EL2N pruning, local-loss steps, then split steps whose activations
    and gradients are counted on the wire. `split_steps: null` = client.max_steps."""

    export_formats = ("peft",)
    trains_through_offload = False  # the prompt is drawn from the embedding weights at attach

    def __init__(
        self,
        num_virtual_tokens: int = 8,
        head_layers: int = 1,
        tail_layers: int = 1,
        keep_ratio: float = 0.5,
        prune_every: int = 1,
        local_loss_steps: int = 2,
        split_steps: Optional[int] = None,
        train_tail: Literal["none", "norms", "blocks"] = "none",  # tail tensors trained and averaged with the prompt
        prompt_init: Literal["vocab", "random"] = "vocab",  # embeddings of random tokens, or N(0, embedding std)
    ):
        if num_virtual_tokens <= 0:
            raise RecipeError("adapter.num_virtual_tokens must be positive")
        if not 0.0 < keep_ratio <= 1.0:
            raise RecipeError("adapter.keep_ratio must be in (0, 1]")
        if prune_every <= 0 or local_loss_steps < 0 or (split_steps is not None and split_steps < 0):
            raise RecipeError("adapter.prune_every must be positive; local_loss_steps and split_steps not negative")
        self.p, self.head_layers, self.tail_layers = num_virtual_tokens, head_layers, tail_layers
        self.keep_ratio, self.prune_every = keep_ratio, prune_every
        self.local_loss_steps, self.split_steps = local_loss_steps, split_steps
        self.train_tail, self.prompt_init = train_tail, prompt_init
        # client -> indices kept at its last scoring; a cache, not state: a client missing
        # from it (after a resume, or on another rank) is simply scored again
        self.kept: dict[int, list[int]] = {}

    # ---- the model --------------------------------------------------------------------
    def attach(self, model, seed):
        try:
            split = SplitLM(model, self.head_layers, self.tail_layers)
        except ValueError as err:
            raise RecipeError(f"adapter: {err}") from None
        weight = split.embed.weight.detach()
        generator = torch.Generator().manual_seed(seed)
        if self.prompt_init == "vocab":
            prompt = weight[torch.randint(0, weight.shape[0], (self.p,), generator=generator)].float().cpu()
        else:
            prompt = torch.randn(self.p, weight.shape[1], generator=generator) * weight.float().std().item()
        wrapped = PromptedLM(model, prompt.to(weight.device), self.head_layers, self.tail_layers)
        self.prepare_local_round(wrapped)
        return wrapped

    def tail_parameters(self, model: PromptedLM) -> dict[str, torch.nn.Parameter]:
        """The tail tensors `train_tail` enables (the LM head never: it may be tied to the
        head's embeddings, and it is the largest matrix)."""
        if self.train_tail == "none":
            return {}
        split, chosen = model.split, {}
        modules = [split.blocks[i] for i in split.tail_blocks]
        for module in modules:
            for name, p in module.named_parameters():
                if self.train_tail == "blocks" or "norm" in name or "ln_" in name:
                    chosen[id(p)] = p
        for p in split.final_norm.parameters():
            chosen[id(p)] = p
        return {n: p for n, p in model.named_parameters() if id(p) in chosen}

    def prepare_local_round(self, model):
        enabled = {id(p) for p in self.tail_parameters(model).values()}
        for name, p in model.named_parameters():
            p.requires_grad_(name == "prompt" or id(p) in enabled)

    def metadata(self, model):
        split = model.split
        return {
            "num_virtual_tokens": self.p, "head_blocks": list(split.head_blocks), "body_blocks": list(split.body_blocks),
            "tail_blocks": list(split.tail_blocks), "train_tail": self.train_tail,
        }

    # ---- one client's round -------------------------------------------------------------
    def local_loop(self) -> "SplitLoop":
        return SplitLoop(self)

    @torch.no_grad()
    def scores(self, model: PromptedLM, examples, batch_size: int, pad_token_id: int, device) -> torch.Tensor:
        """EL2N of every example through the head→tail shortcut (eval mode: no dropout)."""
        was_training = model.training
        model.eval()
        out = []
        for start in range(0, len(examples), batch_size):
            inputs = {k: v.to(device) for k, v in collate(examples[start : start + batch_size], pad_token_id).items()}
            logits = model.split.shortcut(inputs["input_ids"], inputs["attention_mask"], model.prompt)
            out.append(el2n_scores(token_logits(logits, self.p), inputs["labels"]).cpu())
        model.train(was_training)
        return torch.cat(out)

    def prune(self, model, examples, cfg, pad_token_id, device, round: int, client_id: int) -> list[dict]:
        """The hardest `keep_ratio` of the client's examples (highest EL2N), in data order."""
        if self.keep_ratio >= 1.0:
            return list(examples)
        if round % self.prune_every == 0 or client_id not in self.kept:
            scores = self.scores(model, examples, cfg.per_device_train_batch_size, pad_token_id, device)
            order = torch.argsort(scores, descending=True, stable=True)
            self.kept[client_id] = sorted(order[: kept_count(self.keep_ratio, len(examples))].tolist())
        return [examples[i] for i in self.kept[client_id]]

    # ---- export -------------------------------------------------------------------------
    def export(self, model, path, fmt="peft"):
        """A peft prompt-tuning adapter (`PeftModel.from_pretrained(base, path)` gives the
        split model's logits) plus the split configuration; enabled tail tensors, which a
        prompt-tuning adapter cannot carry, go beside it in sfprompt_tail.safetensors."""
        if fmt != "peft":
            raise ValueError(f"unknown export format '{fmt}'; this adapter writes: peft")
        from peft import PromptTuningConfig, get_peft_model

        flags = {n: p.requires_grad for n, p in model.named_parameters()}  # get_peft_model freezes the base
        config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=self.p)
        with quiet_peft():
            peft_model = get_peft_model(model.base, config)
        with torch.no_grad():
            peft_model.prompt_encoder["default"].embedding.weight.copy_(model.prompt)
        peft_model.save_pretrained(path)
        tail = {n.removeprefix("base."): p.detach().cpu().contiguous() for n, p in self.tail_parameters(model).items()}
        if tail:
            save_file(tail, str(Path(path) / TAIL_FILE))
        meta = {**self.metadata(model), "tail_file": TAIL_FILE if tail else None}
        (Path(path) / SPLIT_CONFIG).write_text(json.dumps(meta, indent=1))
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])


class SplitLoop(LocalLoop):
    """SFPrompt's local round in the paper's order: prune, local-loss steps on the shortcut,
    then split steps across the cut. One micro-batch per step and no second pass, so it
    offers the hooks no per-example backward, no regrad and no full-data gradient."""

    name = "adapter sfprompt's split loop"
    # the hooks see each step; the step counts are the adapter's (a strategy's 0 steps still train)
    supports: frozenset[str] = frozenset()

    def __init__(self, adapter: SFPrompt):
        self.adapter = adapter

    def train(self, job: LocalJob, driver: StepDriver) -> SplitResult:
        """Prune, local-loss steps, split steps from x^t (already loaded); returns Δ, the
        split-phase loss, the kept-sample count and the bytes that crossed the cut."""
        cfg, model, params, device, sf = job.cfg, job.model, job.params, job.device, self.adapter
        if cfg.gradient_accumulation_steps != 1 or cfg.fp16:
            raise RecipeError("sfprompt takes one micro-batch per step: set client.gradient_accumulation_steps=1, no fp16")
        torch.manual_seed(job.seed)
        rng = np.random.default_rng(job.seed)
        kept = sf.prune(model, job.examples, cfg, job.pad_token_id, device, job.round, job.client_id)
        optimizer = make_optimizer(cfg, list(params.values()), job.lr)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.bf16 else contextlib.nullcontext()
        split_steps = sf.split_steps if sf.split_steps is not None else (job.steps or cfg.max_steps or 1)
        cut = Cut()
        model.train()

        def step(forward_backward, batch):
            inputs = {k: v.to(device) for k, v in collate(batch, job.pad_token_id).items()}
            with autocast:
                loss = forward_backward(model, inputs, cut)
            driver.step(optimizer.step, lambda: optimizer.zero_grad(set_to_none=True), no_regrad)
            return loss

        batch_size = cfg.per_device_train_batch_size
        local = [step(shortcut_step, b) for b in micro_batches(kept, batch_size, sf.local_loss_steps, rng)]
        split = [step(split_step, b) for b in micro_batches(kept, batch_size, split_steps, rng)]
        losses = split or local  # the loss of the whole model when there is one
        with torch.no_grad():
            update = {k: p.detach().float() - job.x_t[k].to(p.device).float() for k, p in params.items()}
        return SplitResult(
            update=update, num_samples=len(kept), steps=len(local) + len(split), optimizer_state=None,
            train_loss=torch.stack(losses).float().mean().item() if losses else float("nan"),
            split_bytes_up=cut.bytes_up, split_bytes_down=cut.bytes_down,
        )


def no_regrad():
    raise RecipeError("sfprompt's split steps cannot recompute a gradient: pick a strategy without a second pass")


def shortcut_step(model: PromptedLM, inputs, cut: Cut) -> torch.Tensor:
    """Local-loss update: head → tail on the client only; nothing crosses the cut."""
    logits = model.split.shortcut(inputs["input_ids"], inputs["attention_mask"], model.prompt)
    loss = causal_lm_loss(token_logits(logits, len(model.prompt)), inputs["labels"])
    loss.backward()
    return loss.detach()


def split_step(model: PromptedLM, inputs, cut: Cut) -> torch.Tensor:
    """One split forward/backward. Labels and the loss stay on the client; the server sees
    the head's activations (and the extended mask, to attend) and the gradient of its own
    output, and runs its frozen body with no parameter gradient."""
    split, device = model.split, inputs["input_ids"].device
    hidden, mask = split.head(inputs["input_ids"], inputs["attention_mask"], model.prompt)  # client
    got = cut.up(hidden=hidden, attention_mask=mask.bool())
    server_in = got["hidden"].to(device).requires_grad_(True)
    server_out = split.body(server_in, got["attention_mask"].to(device).long())  # server
    client_in = cut.down(hidden=server_out)["hidden"].to(device).requires_grad_(True)
    logits = split.tail(client_in, mask)  # client
    loss = causal_lm_loss(token_logits(logits, len(model.prompt)), inputs["labels"])
    loss.backward()  # tail tensors and ∂L/∂(body output)
    grad_out = cut.up(grad=client_in.grad)["grad"].to(device)
    server_out.backward(grad_out)  # server: only ∂L/∂(body input); the body is frozen
    grad_in = cut.down(grad=server_in.grad)["grad"].to(device)
    hidden.backward(grad_in)  # client: into the prompt through the head
    return loss.detach()

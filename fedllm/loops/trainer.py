"""`client.trainer: hf` — the simulation's local round run by a `transformers.Trainer`: the
same micro-batches in the same order, optimizer, clipping and hook order as the built-in
loop, so the update matches it to float rounding. The resident model is trained in place."""
from __future__ import annotations

import tempfile

import numpy as np
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from fedllm.data import collate
from fedllm.distributed import is_distributed
from fedllm.training import (
    FULL_GRADIENT, REGRAD, VARIABLE_STEPS, LocalJob, LocalLoop, LocalResult, StepDriver, load_optimizer_state,
    make_optimizer, micro_batches, optimizer_state_to_tensors,
)


class ReplayLastBatch:
    """A strategy hook's `regrad`: recomputes the gradients of the last micro-batch at the
    parameters' current values. The Trainer does not hand the batch to callbacks, so a
    forward pre-hook keeps the arguments of the model's last call (the loss is then the
    model's own: no label smoothing or `compute_loss_func`)."""

    def __init__(self, model: torch.nn.Module, params: dict[str, torch.nn.Parameter], args):
        self.model, self.params, self.args, self.last = model, params, args, None
        self.handle = model.register_forward_pre_hook(self.keep, with_kwargs=True)

    def keep(self, module, args, kwargs):
        self.last = (args, kwargs)

    def __call__(self) -> None:
        if self.args.gradient_accumulation_steps != 1 or self.args.fp16:
            raise ValueError("this strategy recomputes gradients within a step: use gradient_accumulation_steps=1, no fp16")
        for p in self.params.values():
            p.grad = None
        args, kwargs = self.last
        with torch.enable_grad():
            out = self.model(*args, **kwargs)
            (out["loss"] if isinstance(out, dict) else out[0]).backward()

    def remove(self) -> None:
        self.handle.remove()


class DriverSteps(TrainerCallback):
    """The driver's step order inside a Trainer whose own clipping is off: strategy hooks and
    clipping just before the Trainer's optimizer step, progress after it."""

    def __init__(self, driver: StepDriver, replay: ReplayLastBatch):
        self.driver, self.replay = driver, replay

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.driver.before_optimizer(self.replay)

    def on_step_end(self, args, state, control, **kwargs):
        self.driver.after_step()


def client_training_args(cfg, steps: int, device: torch.device, output_dir: str) -> TrainingArguments:
    """The recipe's `client:` section as TrainingArguments (same names, same meaning)."""
    return TrainingArguments(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay, bf16=cfg.bf16, fp16=cfg.fp16,
        max_grad_norm=0.0,  # the driver clips, after the strategy hooks
        train_sampling_strategy="sequential",  # the examples come already in the built-in loop's order
        average_tokens_across_devices=False, use_cpu=device.type == "cpu", save_strategy="no", report_to=[],
        logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False,
    )


class TrainerLoop(LocalLoop):
    name = "client.trainer=hf"
    # no per-micro-batch hook: the Trainer runs each backward itself
    supports = frozenset({REGRAD, FULL_GRADIENT, VARIABLE_STEPS})

    def train(self, job: LocalJob, driver: StepDriver) -> LocalResult:
        if is_distributed():
            # accelerate would wrap the resident model in DDP, whose construction is a collective
            # that ranks running different numbers of clients never all reach
            raise ValueError("client.trainer=hf runs the simulation in one process; use client.trainer=builtin with ranks")
        cfg, model, params, steps = job.cfg, job.model, job.params, job.steps
        if steps == 0:  # e.g. FedAMD's anchors: no local step, nothing for a Trainer to do
            zeros = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
            return LocalResult(zeros, len(job.examples), float("nan"), 0, None)
        accumulate = cfg.gradient_accumulation_steps
        rng = np.random.default_rng(job.seed)  # the built-in loop's batch order
        batches = micro_batches(job.examples, cfg.per_device_train_batch_size, steps * accumulate, rng)
        ordered = [e for batch in batches for e in batch]
        optimizer = make_optimizer(cfg, list(params.values()), job.lr)
        if job.optimizer_state:
            load_optimizer_state(optimizer, job.optimizer_state)
        constant = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)  # the engine schedules lr across rounds
        replay = ReplayLastBatch(model, params, None)
        with tempfile.TemporaryDirectory() as scratch:
            args = client_training_args(cfg, steps, job.device, scratch)
            replay.args = args
            trainer = Trainer(model=model, args=args, train_dataset=ordered, optimizers=(optimizer, constant),
                              data_collator=lambda batch: collate(batch, job.pad_token_id),
                              callbacks=[DriverSteps(driver, replay)])
            trainer.model_accepts_loss_kwargs = False  # per-micro-batch mean loss / accumulation, as the built-in loop
            trainer.remove_callback(PrinterCallback)  # no log lines per client round
            torch.manual_seed(job.seed)  # dropout, as the built-in loop
            output = trainer.train()
        replay.remove()
        with torch.no_grad():
            update = {k: p.detach().float() - job.x_t[k].to(p.device).float() for k, p in params.items()}
        return LocalResult(
            update=update, num_samples=len(job.examples), train_loss=output.training_loss, steps=steps,
            optimizer_state=optimizer_state_to_tensors(optimizer) if cfg.keep_optimizer_state else None,
        )

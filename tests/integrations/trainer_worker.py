"""One rank of the FederatedCallback tests, launched twice with torch.distributed.run (gloo).
Each rank is one client with its own shard of the bundled data; every scenario writes
what it saw to <out>/<scenario>_rank<r>.safetensors (+ log history JSON on rank 0)."""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from fedllm.adapters.ffa_lora import FFALoRA
from fedllm.adapters.lora import LoRA
from fedllm.data import collate, prepare_data
from fedllm.integrations import FederatedCallback
from fedllm.models import byte_tokenizer, load_model
from fedllm.recipe import DataConfig, ModelConfig

OUT = Path(sys.argv[1])
RANK = int(__import__("os").environ["RANK"])
TOKENIZER = byte_tokenizer()
DATA = prepare_data(DataConfig(max_samples=120, max_length=96, eval_fraction=0.1), TOKENIZER, 2, seed=0)


def peft_model(kind=LoRA):
    adapter = kind(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    return adapter.attach(load_model(ModelConfig(), TOKENIZER, seed=0), seed=0)


def lora_state(model) -> dict:
    return {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


class Record(TrainerCallback):
    """Keeps the trainable weights at every sync step, under `<tag>/<step>/<name>`."""

    def __init__(self, tag: str, every: int, into: dict):
        self.tag, self.every, self.into = tag, every, into

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            for k, t in lora_state(model).items():
                self.into[f"{self.tag}/{state.global_step}/{k}"] = t


class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def train(name: str, callbacks: list, max_steps: int = 6, resume=None, kind=LoRA, **extra):
    model = peft_model(kind)
    args = TrainingArguments(
        output_dir=str(OUT / name), per_device_train_batch_size=4, max_steps=max_steps, learning_rate=1e-2,
        use_cpu=True, ddp_backend="gloo", report_to=[], disable_tqdm=True, logging_steps=1, seed=0,
        dataloader_num_workers=0, **{"save_strategy": "no", "lr_scheduler_type": "constant", **extra},
    )
    trainer = Trainer(model=model, args=args, train_dataset=DATA.clients[RANK], callbacks=callbacks,
                      data_collator=lambda batch: collate(batch, TOKENIZER.pad_token_id))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def dump(name: str, tensors: dict, trainer) -> None:
    final = {f"final/{k}": t for k, t in lora_state(trainer.model).items()}
    save_file({k: t.contiguous() for k, t in {**tensors, **final}.items()}, str(OUT / f"{name}_rank{RANK}.safetensors"))
    if RANK == 0:
        (OUT / f"{name}_log.json").write_text(json.dumps(trainer.state.log_history))


def federated():
    seen = {}
    fed = FederatedCallback(strategy="fedavg", local_steps=2)
    trainer = train("fedavg", [Record("local", 2, seen), fed, Record("global", 2, seen)])
    seen["num_samples"] = torch.tensor([fed.num_samples], dtype=torch.float64)
    dump("fedavg", seen, trainer)
    # FFA-LoRA with FedProx: only B trains and travels; 7 steps end with a last 1-step round
    fed = FederatedCallback(strategy={"name": "fedprox", "mu": 0.1}, adapter={"name": "ffa_lora", "r": 4, "alpha": 8},
                            local_steps=3)
    trainer = train("ffa", [fed], max_steps=7, kind=FFALoRA)
    fresh = peft_model(FFALoRA)
    initial = {f"init/{k}": t for k, t in lora_state(fresh).items()}
    initial.update({f"a_init/{k}": p.detach() for k, p in fresh.named_parameters() if "lora_A" in k})
    frozen = {f"a/{k}": p.detach() for k, p in trainer.model.named_parameters() if "lora_A" in k}
    dump("ffa", {**initial, **frozen}, trainer)


class SwitchOnly(FederatedCallback):
    """The callback's gradient-sync switch-off (on_train_begin) without its rounds."""

    def on_step_end(self, *args, **kwargs):
        pass

    def on_train_end(self, *args, **kwargs):
        pass


def controls():
    # without the callback's rounds, the clients drift apart
    dump("nosync", {}, train("nosync", [SwitchOnly(local_steps=2)]))
    # no callback at all: DDP averages every step's gradients and the ranks stay identical
    dump("ddp", {}, train("ddp", []))


def resume():
    # SCAFFOLD: server state (c), client state (c_i), gradient hooks; saved mid-round at step 3
    opts = dict(save_strategy="steps", save_steps=3, lr_scheduler_type="linear")
    runs = {}
    for name, stop, start in (("full", [], None), ("part", [StopAt(3)], None), ("resumed", [], "part/checkpoint-3")):
        fed = FederatedCallback(strategy="scaffold", local_steps=2)
        resume_from = str(OUT / start) if start else None
        trainer = train("part" if name == "resumed" else name, [fed, *stop], resume=resume_from, **opts)
        runs[name] = (trainer, fed)
    for name in ("full", "resumed"):
        trainer, fed = runs[name]
        dump(name, {f"server/{k}": t for k, t in fed.server_state.items()}, trainer)


def private():
    # DP-FedAvg with the budget given as the recipe's privacy: section would give it; the
    # server noise is secret, so both ranks must draw it from rank 0's generator
    seen = {}
    fed = FederatedCallback(strategy={"name": "dp_fedavg", "clip_norm": 0.05}, privacy={"noise_multiplier": 1.0},
                            local_steps=2)
    trainer = train("dp", [Record("local", 2, seen), fed, Record("global", 2, seen)], max_steps=4)
    dump("dp", seen, trainer)


if __name__ == "__main__":
    torch.set_num_threads(1)
    for scenario in sys.argv[2:]:
        {"federated": federated, "controls": controls, "resume": resume, "private": private}[scenario]()

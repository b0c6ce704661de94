"""One fixed FederatedCallback run for bench/identical_runs.py: a transformers Trainer in one
CPU process (one client), LoRA on the tiny-llama preset with the byte tokenizer, DP-FedAvg
with seeded server noise (so the noise and the ε accounting are covered, reproducibly), 3
rounds of 2 local steps.

    python bench/trainer_run.py OUT    # OUT/final/adapter.safetensors, OUT/metrics.jsonl

metrics.jsonl is the Trainer's log_history without its timings, one row a line.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Trainer, TrainingArguments

from fedllm.adapters.lora import LoRA
from fedllm.data import collate, prepare_data
from fedllm.integrations import FederatedCallback
from fedllm.models import byte_tokenizer, load_model
from fedllm.recipe import DataConfig, ModelConfig

SEED = 0
LOCAL_STEPS, MAX_STEPS = 2, 6  # three rounds
TIMING_KEYS = {"train_runtime"}  # and every "*_per_second"


def federated_trainer(out: Path) -> tuple[Trainer, LoRA]:
    tokenizer = byte_tokenizer()
    data = prepare_data(DataConfig(max_samples=120, max_length=96, eval_fraction=0.1), tokenizer, 1, seed=SEED)
    adapter = LoRA(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = adapter.attach(load_model(ModelConfig(), tokenizer, seed=SEED), seed=SEED)
    # seeded noise: reproducible, and for that reason not private (fedllm.privacy.budget)
    callback = FederatedCallback(strategy={"name": "dp_fedavg", "clip_norm": 0.05}, local_steps=LOCAL_STEPS,
                                 privacy={"noise_multiplier": 1.0, "noise_seed": 1234}, seed=SEED)
    args = TrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=4, max_steps=MAX_STEPS, learning_rate=1e-2,
        lr_scheduler_type="constant", use_cpu=True, report_to=[], disable_tqdm=True, logging_steps=1, seed=SEED,
        dataloader_num_workers=0, save_strategy="no",
    )
    trainer = Trainer(model=model, args=args, train_dataset=data.clients[0], callbacks=[callback],
                      data_collator=lambda batch: collate(batch, tokenizer.pad_token_id))
    return trainer, adapter


def without_timings(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMING_KEYS and not k.endswith("_per_second")}


def main(out: Path) -> None:
    torch.set_num_threads(1)
    trainer, adapter = federated_trainer(out)
    trainer.train()
    (out / "final").mkdir(parents=True, exist_ok=True)
    final = {k: t.contiguous() for k, t in adapter.state(trainer.model).items()}
    save_file(final, str(out / "final" / "adapter.safetensors"))
    rows = [json.dumps(without_timings(row), sort_keys=True) for row in trainer.state.log_history]
    (out / "metrics.jsonl").write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))

"""One rank of the test of FederatedCallback under a Trainer that shards one LoRA model over 2
ranks (torch.distributed.run), which are then ONE client: MODE fsdp (FSDP2, GPUs only: on CPU a
Trainer falls back to DDP) or zero2 / zero3 (DeepSpeed; on CPU its CPU accelerator over gloo).
Writes the adapter, gathered whole, before (local/<step>/) and after (global/<step>/) every sync.
argv: OUT MODE."""
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from fedllm.adapters.lora import LoRA
from fedllm.data import collate, prepare_data
from fedllm.integrations import FederatedCallback
from fedllm.models import byte_tokenizer, load_model
from fedllm.recipe import DataConfig, ModelConfig

OUT, MODE, RANK = Path(sys.argv[1]), sys.argv[2], int(os.environ["RANK"])
ZERO = MODE.startswith("zero")

if ZERO:
    from fedllm.zero import config, gather_trainable
else:
    from fedllm.distributed import gather_trainable


class Record(TrainerCallback):
    def __init__(self, tag: str, into: dict):
        self.tag, self.into, self.trainer = tag, into, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % 2 == 0:  # collective: every rank gathers
            for k, t in gather_trainable(self.trainer.model_wrapped).items():
                self.into[f"{self.tag}/{state.global_step}/{k}"] = t


def sharding() -> dict:
    """The TrainingArguments that shard the model the way MODE names."""
    if MODE == "fsdp":
        return {"fsdp": "full_shard", "fsdp_config": {"version": 2}}
    stage = {"zero2": 2, "zero3": 3}[MODE]
    return {"deepspeed": {**config(stage), "train_micro_batch_size_per_gpu": "auto",
                          "gradient_accumulation_steps": "auto", "zero_allow_untested_optimizer": True}}


def main():
    tokenizer = byte_tokenizer()
    data = prepare_data(DataConfig(max_samples=120, max_length=96, eval_fraction=0.1), tokenizer, 1, seed=0)
    model = LoRA(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]).attach(
        load_model(ModelConfig(), tokenizer, seed=0), seed=0)
    seen = {f"init/{k}": p.detach().cpu().clone() for k, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(output_dir=str(OUT / MODE), per_device_train_batch_size=2, max_steps=4, learning_rate=1e-2,
                             report_to=[], disable_tqdm=True, save_strategy="no", lr_scheduler_type="constant", seed=0,
                             **sharding())
    records = [Record("local", seen), Record("global", seen)]
    fed = FederatedCallback(strategy={"name": "fedavg", "server_lr": 0.5}, local_steps=2)
    trainer = Trainer(model=model, args=args, train_dataset=data.clients[0], callbacks=[records[0], fed, records[1]],
                      data_collator=lambda batch: collate(batch, tokenizer.pad_token_id))
    for record in records:
        record.trainer = trainer
    trainer.train()
    if ZERO:
        assert type(trainer.model_wrapped).__name__ == "DeepSpeedEngine", type(trainer.model_wrapped)  # not a DDP fallback
    save_file({k: t.contiguous().cpu() for k, t in seen.items()}, str(OUT / f"{MODE}_rank{RANK}.safetensors"))
    if ZERO:
        # left to interpreter exit, the teardown of DeepSpeed's CPU collectives sometimes aborts
        # ("terminate called without an active exception", seen once in 3 runs under ZeRO-3)
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

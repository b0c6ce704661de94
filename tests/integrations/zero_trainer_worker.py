"""One rank of the test of FederatedCallback under DeepSpeed ZeRO-2/3 (torch.distributed.run,
2 processes; on CPU DeepSpeed's CPU accelerator over gloo): the Trainer's DeepSpeed engine
spreads one LoRA model over both ranks, which are then ONE client. Writes the adapter, gathered
whole, before (local/<step>/) and after (global/<step>/) every sync. argv: OUT STAGE."""
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from fedllm.adapters.lora import LoRA
from fedllm.data import collate, prepare_data
from fedllm.integrations import FederatedCallback
from fedllm.zero import config, gather_trainable
from fedllm.models import byte_tokenizer, load_model
from fedllm.recipe import DataConfig, ModelConfig

OUT, STAGE, RANK = Path(sys.argv[1]), int(sys.argv[2]), int(os.environ["RANK"])


class Record(TrainerCallback):
    def __init__(self, tag: str, into: dict):
        self.tag, self.into, self.trainer = tag, into, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % 2 == 0:  # collective: every rank gathers
            for k, t in gather_trainable(self.trainer.model_wrapped).items():
                self.into[f"{self.tag}/{state.global_step}/{k}"] = t


def main():
    tokenizer = byte_tokenizer()
    data = prepare_data(DataConfig(max_samples=120, max_length=96, eval_fraction=0.1), tokenizer, 1, seed=0)
    model = LoRA(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]).attach(
        load_model(ModelConfig(), tokenizer, seed=0), seed=0)
    seen = {f"init/{k}": p.detach().cpu().clone() for k, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(output_dir=str(OUT / "zero"), per_device_train_batch_size=2, max_steps=4, learning_rate=1e-2,
                             report_to=[], disable_tqdm=True, save_strategy="no", lr_scheduler_type="constant", seed=0,
                             deepspeed={**config(STAGE), "train_micro_batch_size_per_gpu": "auto",
                                        "gradient_accumulation_steps": "auto", "zero_allow_untested_optimizer": True})
    records = [Record("local", seen), Record("global", seen)]
    fed = FederatedCallback(strategy={"name": "fedavg", "server_lr": 0.5}, local_steps=2)
    trainer = Trainer(model=model, args=args, train_dataset=data.clients[0], callbacks=[records[0], fed, records[1]],
                      data_collator=lambda batch: collate(batch, tokenizer.pad_token_id))
    for record in records:
        record.trainer = trainer
    trainer.train()
    assert type(trainer.model_wrapped).__name__ == "DeepSpeedEngine", type(trainer.model_wrapped)  # not a DDP fallback
    save_file({k: t.contiguous().cpu() for k, t in seen.items()}, str(OUT / f"zero{STAGE}_rank{RANK}.safetensors"))
    # left to interpreter exit, the teardown of DeepSpeed's CPU collectives sometimes aborts
    # ("terminate called without an active exception", seen once in 3 runs under ZeRO-3)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

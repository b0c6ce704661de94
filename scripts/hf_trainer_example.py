"""A plain Hugging Face Trainer LoRA fine-tuning script; the federated part is the callback.

    accelerate launch --multi_gpu --num_processes 4 scripts/hf_trainer_example.py   # 4 clients on GPUs
    torchrun --nproc_per_node 2 scripts/hf_trainer_example.py                       # 2 clients, CPU/gloo
    python scripts/hf_trainer_example.py                                             # 1 process: plain training

Each process is one client. Here every process loads the same dataset and accelerate deals
each one its own share of the batches (an IID split); a real silo would load its own data.
Offline by default: the built-in tiny-llama preset and the bundled dataset.
"""
import argparse
import os

import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

from fedllm.data import collate, prepare_data
from fedllm.integrations import FederatedCallback  # federated line 1 of 2
from fedllm.models import byte_tokenizer, load_model
from fedllm.recipe import DataConfig, ModelConfig


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", default="runs/hf_trainer_example")
    parser.add_argument("--max_steps", type=int, default=40)
    parser.add_argument("--local_steps", type=int, default=10)
    parser.add_argument("--strategy", default="fedavg")
    cli = parser.parse_args()

    tokenizer = byte_tokenizer()
    model = load_model(ModelConfig(name="tiny-llama"), tokenizer, seed=0)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    data = prepare_data(DataConfig(max_length=256), tokenizer, num_clients=1, seed=0)

    # gloo only when a launcher started several processes: one plain process has no process group
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    args = TrainingArguments(
        output_dir=cli.output_dir, max_steps=cli.max_steps, per_device_train_batch_size=4, learning_rate=2e-3,
        lr_scheduler_type="constant", logging_steps=5, save_steps=20, report_to=[],
        use_cpu=not torch.cuda.is_available(), ddp_backend="gloo" if several and not torch.cuda.is_available() else None,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=data.clients[0], eval_dataset=data.eval,
        data_collator=lambda batch: collate(batch, tokenizer.pad_token_id),
        callbacks=[FederatedCallback(strategy=cli.strategy, local_steps=cli.local_steps)],  # federated line 2 of 2
    )
    trainer.train()
    print(trainer.evaluate())
    trainer.save_model(cli.output_dir + "/final")  # a PEFT adapter: the last global state


if __name__ == "__main__":
    main()

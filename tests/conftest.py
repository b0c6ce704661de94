import os

import pytest
import yaml

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def tiny_recipe(tmp_path, **sections) -> dict:
    """A recipe small enough for a test: 4 clients, 2 per round, 2 local steps, 3 rounds."""
    recipe = {
        "seed": 0,
        "model": {"name": "tiny-llama"},
        "data": {"path": "bundled:quickstart", "max_samples": 240, "max_length": 96, "eval_fraction": 0.2},
        "adapter": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "o_proj"]},
        "strategy": {"name": "fedavg"},
        "federation": {"rounds": 3, "num_clients": 4, "clients_per_round": 2},
        "client": {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 0.01},
        "eval": {"every": 1, "per_device_eval_batch_size": 16, "max_batches": 2},
        "output": {"dir": str(tmp_path / "runs"), "name": "run", "checkpoint_every": 1, "progress": False},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) else value
    return recipe


@pytest.fixture
def recipe_file(tmp_path):
    def write(**sections):
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(tiny_recipe(tmp_path, **sections)))
        return path

    return write


# ---- a Hugging Face Trainer run with the FederatedCallback (one process) ---------------------
def lora_for_trainer():
    """The tiny preset with LoRA on q/v, its byte tokenizer, and one client's 60 bundled rows."""
    from fedllm.adapters.lora import LoRA
    from fedllm.data import prepare_data
    from fedllm.models import byte_tokenizer, load_model
    from fedllm.recipe import DataConfig, ModelConfig

    tokenizer = byte_tokenizer()
    data = prepare_data(DataConfig(max_samples=60, max_length=64, eval_fraction=0.1), tokenizer, 1, seed=0)
    model = LoRA(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]).attach(
        load_model(ModelConfig(), tokenizer, seed=0), seed=0)
    return model, tokenizer, data.clients[0]


def trainable_copy(model) -> dict:
    return {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


def train_with(tmp_path, model, tokenizer, rows, callbacks, max_steps: int = 4):
    """A Trainer run on the CPU: batch 4, constant lr 1e-2, logging every step; returns the Trainer."""
    from transformers import Trainer, TrainingArguments

    from fedllm.data import collate

    args = TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=4, max_steps=max_steps,
                             learning_rate=1e-2, use_cpu=True, report_to=[], disable_tqdm=True, logging_steps=1, seed=0,
                             save_strategy="no", lr_scheduler_type="constant", dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=callbacks,
                      data_collator=lambda batch: collate(batch, tokenizer.pad_token_id))
    trainer.train()
    return trainer

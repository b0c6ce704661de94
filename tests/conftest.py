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

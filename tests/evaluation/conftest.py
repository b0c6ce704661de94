from pathlib import Path

import pytest
import yaml

from fedllm.engine import run_recipe
from tests.conftest import tiny_recipe


def finished_run(tmp_path_factory, name: str, **sections) -> Path:
    tmp = tmp_path_factory.mktemp(name)
    recipe = tiny_recipe(tmp, federation={"rounds": 2}, **sections)
    recipe["output"]["name"] = name
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return run_recipe(str(path))


@pytest.fixture(scope="session")
def pooled_run(tmp_path_factory) -> Path:
    """A finished 2-round quickstart-like run with one pooled held-out set (the default)."""
    return finished_run(tmp_path_factory, "pooled")


@pytest.fixture(scope="session")
def per_client_run(tmp_path_factory) -> Path:
    """The same with eval.per_client: every client holds out its own slice."""
    return finished_run(tmp_path_factory, "per_client", eval={"per_client": True})

"""Lean processes: what a process never uses, it never imports. `datasets` (with pyarrow and
pandas: +80 MiB, 1-3 s) loads only for a local file or a Hub dataset, dp-accounting (+30
MiB, 3 s) only when privacy is accounted; every rank of a run would pay for them. scipy and
accelerate are not on the list: transformers' modeling and peft import them themselves."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedllm.lazy import LazyModule

ROOT = Path(__file__).resolve().parents[1]
UNNEEDED = ("datasets", "pyarrow", "pandas", "dp_accounting")


def imported_after(code: str) -> dict[str, bool]:
    """Which of UNNEEDED (and torch) a fresh interpreter has imported after running `code`."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps({{m: m in sys.modules for m in {UNNEEDED + ('torch',)!r}}}))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_command_line_starts_without_torch_or_datasets():
    loaded = imported_after("import contextlib, io\nfrom fedllm import cli\n"
                            "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
                            "    cli.main(['--help'])")
    assert loaded == dict.fromkeys(UNNEEDED + ("torch",), False)


@pytest.mark.slow  # a fresh interpreter importing torch, transformers and peft: several seconds
def test_engine_list_and_bundled_data_import_no_datasets_pyarrow_pandas_or_dp_accounting():
    loaded = imported_after(
        "import contextlib, io\nfrom fedllm import cli, engine\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n    cli.main(['list'])\n"
        "from fedllm.data import prepare_data\nfrom fedllm.models import byte_tokenizer\nfrom fedllm.recipe import DataConfig\n"
        "data = prepare_data(DataConfig(max_samples=200), byte_tokenizer(), 4, 0)\nassert sum(data.client_sizes) > 100"
    )
    assert loaded == {**dict.fromkeys(UNNEEDED, False), "torch": True}


def test_written_out_rdp_orders_are_the_librarys():
    from dp_accounting.rdp import rdp_privacy_accountant

    import fedllm.strategies  # noqa: F401  (fedllm.privacy imported first runs into a package-level import cycle)
    from fedllm.privacy.accountant import ORDERS

    assert ORDERS == tuple(rdp_privacy_accountant.DEFAULT_RDP_ORDERS)


def test_a_lazy_module_is_imported_by_its_first_attribute_read(tmp_path, monkeypatch):
    (tmp_path / "fedllm_lazy_probe.py").write_text("VALUE = 41 + 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fedllm_lazy_probe", raising=False)
    probe = LazyModule("fedllm_lazy_probe")
    assert "fedllm_lazy_probe" not in sys.modules
    assert probe.VALUE == 42 and "fedllm_lazy_probe" in sys.modules
    with pytest.raises(AttributeError):
        probe.missing  # noqa: B018


def test_each_plugin_package_imports_first_in_a_fresh_process():
    # a package-level cycle shows only when that package is the first one imported
    for package in ("fedllm.privacy", "fedllm.strategies", "fedllm.codecs", "fedllm.adapters", "fedllm.attacks"):
        done = subprocess.run([sys.executable, "-c", f"import {package}"], capture_output=True, text=True)
        assert done.returncode == 0, f"{package}: {done.stderr.strip().splitlines()[-1]}"


def test_a_party_reads_its_recipe_without_torch():
    # `fedllm join` only hands the recipe to its worker (which checks it whole): no torch for that
    loaded = imported_after(
        "from fedllm.deploy import launch, relay\n"
        "r = launch.party_recipe('recipes/quickstart.yaml', ['federation.num_clients=2', 'client.max_steps=3'])\n"
        "assert r.federation.num_clients == 2 and r.client.max_steps == 3\n"
        "assert 'num_clients: 2' in launch.dump_recipe(r)"
    )
    assert loaded["torch"] is False

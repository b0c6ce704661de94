"""bench/gpu_check.sh and its python part: without CUDA the script skips cleanly; the
fedllm-vs-bare-loop comparison itself runs on CPU (--device cpu) on the same batches."""
import argparse
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def bench_module():
    spec = importlib.util.spec_from_file_location("gpu_compare", ROOT / "bench" / "gpu_compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def options(**kw):
    return argparse.Namespace(**{"device": "cpu", "size": "tiny", "clients": 2, "steps": 2, "batch": 4, "reps": 1, **kw})


@pytest.mark.slow  # a subprocess importing torch
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_without_cuda_the_gpu_check_says_so_and_exits_0():
    out = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0 and out.stdout.strip() == "no CUDA: skipped"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_the_gpu_check_is_shellcheck_clean():
    out = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("check", ["fp32", "device_map", "dp_sgd"])
def test_fedllm_and_the_bare_loop_train_on_the_same_batches_and_both_report_tokens_per_second(check, capsys):
    bench_module().compare(check, options())
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(check) and "losses agree" in line, line
    fedllm, bare = (float(line.split(side)[1].split("tok/s")[0].replace(",", "")) for side in ("fedllm", "bare"))
    assert fedllm > 0 and bare > 0


@pytest.mark.slow
def test_a_finished_run_is_compared_with_the_bare_loop_on_its_last_round(tmp_path, capsys):
    from fedllm.engine import run_recipe

    bench = bench_module()
    base = bench.save_base(tmp_path, "tiny")
    recipe = bench.base_recipe(base, tmp_path / "runs" / "one", clients=2, steps=2, batch=4)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run_dir = run_recipe(str(tmp_path / "recipe.yaml"))
    assert bench.compare_run(options(check="nccl", run_dir=str(run_dir)))
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("nccl") and "PASS" in line and "final adapter finite" in line

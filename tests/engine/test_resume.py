"""A run killed with SIGKILL mid-round and resumed ends with the same adapter, bit for bit."""
import json
import os
import signal
import subprocess
import sys
import time

from safetensors.torch import load_file

from fedllm.engine import resume_run, run_recipe

SECTIONS = dict(
    federation={"rounds": 5, "num_clients": 4, "clients_per_round": 2},
    client={"max_steps": 16, "keep_optimizer_state": True},
    strategy={"name": "fedadam", "server_lr": 0.01},  # server state (moments) must survive too
    eval={"every": 2},
)


def final_adapter(run_dir):
    return load_file(str(run_dir / "final" / "adapter_model.safetensors"))


def rounds_logged(run_dir):
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_resume_after_sigkill_mid_round_is_bit_exact(recipe_file, tmp_path):
    path = recipe_file(**SECTIONS)
    reference = final_adapter(run_recipe(str(path)))

    killed_dir = tmp_path / "runs" / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedllm", "run", str(path), "output.name=killed"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while rounds_logged(killed_dir) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.2)  # into round 3 (a round takes about a second)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = rounds_logged(killed_dir)
    assert 2 <= done < 5, f"the kill should land mid-run, after {done} rounds"
    assert not (killed_dir / "final").exists()

    resume_run(str(killed_dir))
    resumed = final_adapter(killed_dir)
    assert resumed.keys() == reference.keys()
    assert all((resumed[k] == reference[k]).all() for k in reference)
    rows = [json.loads(line) for line in (killed_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3, 4, 5]  # no round lost, none logged twice


def test_resume_of_a_finished_run_changes_nothing(recipe_file):
    run_dir = run_recipe(str(recipe_file(federation={"rounds": 2})))
    before = final_adapter(run_dir)
    resume_run(str(run_dir))
    after = final_adapter(run_dir)
    assert all((before[k] == after[k]).all() for k in before)

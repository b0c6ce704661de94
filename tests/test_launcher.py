"""`fedllm run --processes N`: N ranks forked on this machine after one import, ending where
torchrun's N ranks end; a failed rank ends the launch with its status."""
import atexit
import json
import os
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from fedllm.launcher import fork_ranks
from tests.engine.test_distributed import launch_two_processes


def cli(*args, env=None, timeout=300):
    try:
        return subprocess.run([sys.executable, "-m", "fedllm", *args], capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"timed out; stderr: {err.stderr[-3000:] if err.stderr else None}") from None


def test_each_rank_gets_the_environment_torchrun_gives_it(tmp_path):
    def command():
        names = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        (tmp_path / f"rank{os.environ['RANK']}.json").write_text(json.dumps({n: os.environ[n] for n in names}))
        return 0

    assert fork_ranks(3, command) == 0
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    assert [(s["RANK"], s["LOCAL_RANK"], s["WORLD_SIZE"], s["LOCAL_WORLD_SIZE"]) for s in seen] == \
        [(str(r), str(r), "3", "3") for r in range(3)]
    assert len({s["MASTER_PORT"] for s in seen}) == 1 and seen[0]["MASTER_ADDR"] == "127.0.0.1"
    assert "RANK" not in os.environ  # the launching process itself is no rank


def test_the_first_failed_rank_ends_the_others_and_gives_the_status(tmp_path, capfd):
    def command():
        if os.environ["RANK"] == "1":
            return 3
        time.sleep(60)  # a rank that would wait on the failed one in its next collective
        (tmp_path / "finished").write_text("")
        return 0

    start = time.monotonic()
    assert fork_ranks(2, command) == 3
    assert time.monotonic() - start < 20
    assert not (tmp_path / "finished").exists()
    assert "rank 1 of 2 ended with status 3; ending the other 1 rank(s)" in capfd.readouterr().err


def test_a_rank_killed_by_a_signal_gives_128_plus_its_number():
    def command():
        os.kill(os.getpid(), 9)
        return 0

    assert fork_ranks(1, command) == 137


@pytest.mark.parametrize("processes, env, expected", [
    ("0", {}, "--processes 0: give the number of ranks"),
    ("2", {"RANK": "0", "WORLD_SIZE": "2"}, "--processes inside a launched rank (RANK is set)"),
])
def test_a_launch_that_cannot_fork_is_refused_in_one_line(recipe_file, processes, env, expected):
    out = cli("run", str(recipe_file()), "--processes", processes, env=env, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"fedllm: error: {out.stderr.split('fedllm: error: ')[1].strip()}"]
    assert expected in out.stderr


def test_a_mistake_in_the_recipe_is_reported_once_not_per_rank(recipe_file):
    out = cli("run", str(recipe_file()), "strategy.name=fedavgg", "--processes", "2", timeout=120)
    assert out.returncode == 2
    assert out.stderr.count("fedllm: error:") == 1 and "fedavgg" in out.stderr


@pytest.mark.slow
def test_two_forked_ranks_end_bit_for_bit_where_two_torchrun_ranks_end(recipe_file, tmp_path):
    path = recipe_file(federation={"rounds": 2, "num_clients": 5, "clients_per_round": 3})
    out = cli("run", str(path), "output.name=forked", "--processes", "2")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("done: 2 rounds") == 1  # rank 0 alone prints the summary
    launch_two_processes(path, "torchrun")
    runs = tmp_path / "runs"
    forked, torchrun = (load_file(str(runs / n / "final" / "adapter_model.safetensors")) for n in ("forked", "torchrun"))
    assert forked.keys() == torchrun.keys()
    assert all(forked[k].equal(torchrun[k]) for k in forked)
    assert (runs / "forked" / "ledger.jsonl").read_text() == (runs / "torchrun" / "ledger.jsonl").read_text()
    meta = json.loads((runs / "forked" / "run_meta.json").read_text())
    assert meta["world_size"] == 2


def test_a_rank_runs_the_exit_handlers_it_registered_not_the_launchers(tmp_path):
    def launcher_handler():
        (tmp_path / f"launcher_handler_in_{os.getpid()}").write_text("")

    def command():
        atexit.register(lambda: (tmp_path / f"rank{os.environ['RANK']}_handler").write_text(""))
        return 0

    atexit.register(launcher_handler)
    try:
        assert fork_ranks(2, command) == 0
    finally:
        atexit.unregister(launcher_handler)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0_handler", "rank1_handler"]

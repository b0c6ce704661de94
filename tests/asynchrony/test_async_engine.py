"""Asynchronous and buffered federations in the engine: equal speeds reproduce sync FedAvg,
staleness is counted and weighed, a killed run resumes bit-exactly, sync runs gain only the
simulated-time columns."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from fedllm.capabilities import check_pairings
from fedllm.cli import main
from fedllm.engine import Federation, resume_run, run_recipe
from fedllm.metrics import plot_run
from fedllm.recipe import load_recipe
from fedllm.registry import RecipeError


def final_adapter(run_dir):
    return load_file(str(run_dir / "final" / "adapter_model.safetensors"))


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


FED = {"rounds": 3, "num_clients": 4, "clients_per_round": 2}


@pytest.mark.slow
def test_async_with_equal_speeds_and_full_concurrency_is_sync_fedavg(recipe_file):
    sync_dir = run_recipe(str(recipe_file(output={"name": "sync"})))
    async_dir = run_recipe(str(recipe_file(output={"name": "async"}, federation={
        **FED, "mode": "async", "max_concurrency": 2, "devices": {"profile": "equal"}, "staleness": {"name": "polynomial"}})))
    assert same(final_adapter(sync_dir), final_adapter(async_dir))
    for s, a in zip(metrics(sync_dir), metrics(async_dir), strict=True):
        assert (s["train_loss"], s["eval_loss"], s["bytes_up"]) == (a["train_loss"], a["eval_loss"], a["bytes_up"])
        assert a["staleness_max"] == 0 and a["server_version"] == s["round"]  # rounds count from 1
    times = [r["sim_time"] for r in metrics(async_dir)]
    assert times == pytest.approx([times[0] * (t + 1) for t in range(3)])  # one equal-length round after another


def test_buffered_updates_are_stale_and_weighed(recipe_file, tmp_path, monkeypatch):
    path = recipe_file(federation={**FED, "mode": "buffered", "max_concurrency": 3, "buffer_size": 1,
                                   "devices": {"profile": "lognormal", "sigma": 1.0}, "staleness": {"name": "polynomial", "a": 0.5}})
    fed = Federation(load_recipe(path), tmp_path / "run")
    seen = []
    scaled = type(fed.asynchrony).adjusted

    def spy(self, collect, tau, start, current):
        out = scaled(self, collect, tau, start, current)
        seen.append((tau, getattr(out, "scale", 1.0)))
        return out

    monkeypatch.setattr(type(fed.asynchrony), "adjusted", spy)
    fed.start()
    rows = fed.run()
    assert len(seen) == 6 and [r["server_version"] for r in rows] == [2, 4, 6]  # buffer 1: one version per arrival
    assert any(tau > 0 for tau, _ in seen)
    assert all(scale == pytest.approx((tau + 1) ** -0.5) for tau, scale in seen)
    assert [r["sim_time"] for r in rows] == sorted(r["sim_time"] for r in rows)


def test_async_needs_devices_and_a_mean_strategy(recipe_file):
    with pytest.raises(RecipeError, match="needs federation.devices"):
        load_recipe(recipe_file(federation={**FED, "mode": "async"}))
    with pytest.raises(RecipeError, match="slow_fraction=0.5"):  # Wang & Gao's setting: slow clients hold the categories
        load_recipe(recipe_file(data={"partitioner": {"name": "intertwined", "slow_categories": ["open_qa"], "slow_fraction": 0.5}}))
    # FedBuff's K is independent of the logged round (a buffer fills across rounds)
    assert load_recipe(recipe_file(federation={**FED, "mode": "buffered", "buffer_size": 3,
                                               "devices": {"profile": "equal"}})).federation.buffer_size == 3
    recipe = load_recipe(recipe_file(federation={**FED, "mode": "async", "devices": {"profile": "equal"}},
                                     strategy={"name": "median"}))
    with pytest.raises(RecipeError, match="strategy 'median' needs every update of a round"):
        check_pairings(recipe)  # before any model is built


def rounds_logged(run_dir):
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.slow
def test_a_killed_async_run_resumes_bit_exactly(recipe_file, tmp_path):
    path = recipe_file(federation={"rounds": 5, "num_clients": 4, "clients_per_round": 2, "mode": "async",
                                   "max_concurrency": 3, "devices": {"profile": "lognormal"},
                                   "staleness": {"name": "hinge", "a": 1.0, "b": 0}, "async_mixing": 0.8},
                       client={"max_steps": 16, "keep_optimizer_state": True}, strategy={"name": "fedadam", "server_lr": 0.01})
    reference = run_recipe(str(path))
    killed = tmp_path / "runs" / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "fedllm", "run", str(path), "output.name=killed"],
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while rounds_logged(killed) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 2 <= rounds_logged(killed) < 5 and not (killed / "final").exists()
    resume_run(str(killed))
    assert same(final_adapter(reference), final_adapter(killed))
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop(metrics(reference)) == drop(metrics(killed))
    assert any(r["staleness_max"] > 0 for r in metrics(killed))


def test_sync_with_devices_logs_simulated_time_and_the_straggler_wait(recipe_file):
    plain = run_recipe(str(recipe_file(federation={**FED, "rounds": 2}, output={"name": "plain"})))
    timed = run_recipe(str(recipe_file(federation={**FED, "rounds": 2, "devices": {"profile": "lognormal"}},
                                       output={"name": "timed"})))
    assert same(final_adapter(plain), final_adapter(timed))
    rows = metrics(timed)
    assert "sim_time" not in metrics(plain)[0]
    assert 0 < rows[0]["sim_time"] < rows[1]["sim_time"] and all(0 < r["straggler_wait"] < 1 for r in rows)
    assert "time.png" in {p.name for p in plot_run(timed)} and "time.png" not in {p.name for p in plot_run(plain)}


def test_list_shows_the_modes_and_the_staleness_functions(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "federation modes: sync, async, buffered" in out and "polynomial" in out and "hinge" in out


def test_the_overlay_of_timed_runs_draws_eval_loss_against_simulated_time(tmp_path):
    from fedllm.evaluation.compare import overlay_figure

    dirs = []
    for name, times in (("sync", [10.0, 20.0]), ("buffered", [3.0, 6.0])):
        run = tmp_path / name
        run.mkdir()
        (run / "recipe.yaml").write_text("adapter: {name: lora}\nstrategy: {name: fedavg}\n")
        (run / "metrics.jsonl").write_text("".join(json.dumps({"round": i, "bytes_up": 1, "eval_loss": 3.0 - i, "sim_time": t}) + "\n"
                                                   for i, t in enumerate(times)))
        dirs.append(run)
    fig = overlay_figure(dirs)
    timed = fig.axes[2]
    assert timed.get_xlabel() == "simulated time (s)"
    assert [list(line.get_xdata()) for line in timed.get_lines()] == [[10.0, 20.0], [3.0, 6.0]]


@pytest.mark.slow
def test_sync_rounds_with_churn_and_links_sample_the_online_and_resume_exactly(recipe_file):
    import shutil

    from fedllm.devices import Devices

    fed = {**FED, "num_clients": 6, "clients_per_round": 3, "devices": {
        "profile": "lognormal", "online_fraction": 0.5, "mean_online_s": 0.5, "uplink_bytes_per_s": 20000.0,
        "downlink_bytes_per_s": 200000.0}}
    path = recipe_file(federation=fed)
    run_dir = run_recipe(str(path))
    recipe = load_recipe(path)
    fedn = Federation(recipe, run_dir.parent / "probe")
    devices = Devices(recipe.federation.devices, recipe.client, fedn.data.clients, recipe.seed)
    ledger = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    start = 0.0
    for row in metrics(run_dir):
        mine = [r for r in ledger if r["round"] == row["round"]]
        assert all(devices.online(r["client"], start) for r in mine) and len(mine) == min(3, row["online_clients"])
        # the round lasts as long as its slowest client's download + training + upload, in the ledger's bytes
        longest = max(devices.duration(r["client"], r["bytes_down"], r["bytes_up"]) for r in mine)
        assert row["sim_time"] == pytest.approx(start + longest)
        assert longest > max(devices.compute(r["client"]) for r in mine)  # the links cost time
        start = row["sim_time"]
    assert min(r["online_clients"] for r in metrics(run_dir)) < 6
    # killed after round 2's checkpoint: the resumed run is the uninterrupted one
    reference, rows = final_adapter(run_dir), metrics(run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "round_3"), shutil.rmtree(run_dir / "final")
    resume_run(str(run_dir))
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert same(reference, final_adapter(run_dir)) and drop(rows) == drop(metrics(run_dir))


@pytest.mark.slow
def test_a_buffered_run_with_churn_resumes_exactly_with_a_half_full_buffer_and_held_uploads(recipe_file):
    import shutil

    path = recipe_file(federation={**FED, "mode": "buffered", "buffer_size": 3, "max_concurrency": 3, "devices": {
        "profile": "lognormal", "online_fraction": 0.6, "mean_online_s": 1.0, "uplink_bytes_per_s": 20000.0}},
        strategy={"name": "scaffold"})
    run_dir = run_recipe(str(path))
    rows = metrics(run_dir)
    assert [(r["server_version"], r["buffered"]) for r in rows] == [(0, 2), (1, 1), (2, 0)]
    reference = final_adapter(run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "round_3"), shutil.rmtree(run_dir / "final")
    resume_run(str(run_dir))  # from round 2: uploads in flight, one waiting in the buffer
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert same(reference, final_adapter(run_dir)) and drop(rows) == drop(metrics(run_dir))

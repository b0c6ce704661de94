"""Engine overhead and memory, measured side by side in one run (CPU, a few minutes).

(a) time: `run_round` with 100 sampled clients / a bare loop doing exactly the same local
    optimizer steps (same model, same batches, same seeds, a fresh AdamW per client) with no
    state load, no serialization, no aggregation. Goal <= 1.05.
(b) memory: peak RSS of a fresh process running one round with 1000 clients / the same
    with 1 client. Goal <= 1.2, besides the per-client states the store holds (reported).

    python bench/overhead.py [--quick] [--threads N] [--reps N] [--profile] [--out FILE]
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import pstats
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fedllm.data import collate
from fedllm.engine import Federation
from fedllm.recipe import recipe_from_dict
from fedllm.state import nbytes
from fedllm.training import client_seed, micro_batches, round_learning_rate

TIME_GOAL, MEMORY_GOAL = 1.05, 1.2


def recipe(run_dir: Path, num_clients: int, per_round: int, max_length: int = 96, **client) -> dict:
    return {
        "seed": 0,
        "model": {"name": "tiny-llama"},
        "data": {"path": "bundled:quickstart", "format": "dolly", "max_length": max_length,
                 "eval_fraction": 0.01, "partitioner": {"name": "iid"}},
        "adapter": {"name": "lora"},
        "strategy": {"name": "fedavg"},
        "federation": {"rounds": 1, "num_clients": num_clients, "clients_per_round": per_round,
                       "client_store_budget_mb": client.pop("budget_mb", 1024.0)},
        "client": {"max_steps": 2, "per_device_train_batch_size": 4, **client},
        "eval": {"max_batches": 2},
        "output": {"dir": str(run_dir.parent), "name": run_dir.name, "progress": False, "checkpoint_every": 0},
    }


# ---- (a) time ----------------------------------------------------------------------------
def bare_round(fed, round: int, clients: list[int]) -> list[float]:
    """The local steps of `run_round` and nothing else: per client, the same seeds, batches,
    optimizer, clipping and step; returns each client's mean loss (to check the batches)."""
    cfg, params = fed.recipe.client, list(fed.params.values())
    lr = round_learning_rate(cfg, round, fed.recipe.federation.rounds)
    fed.model.train()
    losses = []
    for client_id in clients:
        seed = client_seed(fed.recipe.seed, round, client_id)
        torch.manual_seed(seed)  # LoRA dropout draws from it, as in local_round
        rng = np.random.default_rng(seed)
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, fused=cfg.fused_optimizer)  # the kernel the engine picks
        mine = []
        for batch in micro_batches(fed.data.clients[client_id], cfg.per_device_train_batch_size, cfg.max_steps, rng):
            loss = fed.model(**collate(batch, fed.pad_token_id)).loss
            loss.backward()
            mine.append(loss.detach())
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(torch.stack(mine).mean().item())
    return losses


def summary(engine: list[float], bare: list[float], num_clients: int) -> dict:
    return {
        "engine_s": engine, "bare_s": bare,
        "engine_median_s": statistics.median(engine), "bare_median_s": statistics.median(bare),
        "ratio_of_medians": statistics.median(engine) / statistics.median(bare),
        "ratio_of_minimums": min(engine) / min(bare),
        # each engine round against the bare round next to it in time: drift cancels
        "median_paired_ratio": statistics.median(e / b for e, b in zip(engine, bare)),
        "per_client_overhead_ms": 1e3 * (statistics.median(engine) - statistics.median(bare)) / num_clients,
    }


@contextlib.contextmanager
def clocked_local_round(fed, spent: list[float]):
    """Times every local loop's `train` inside run_round (CPU clock), to split the engine's
    overhead into the training loop's own and the rest of the round (load, store, hooks,
    serialization, checks, sum). Costs two clock reads per client."""
    loop = fed.client.loop
    inner = loop.train

    def train(*args, **kwargs):
        start = time.process_time()
        try:
            return inner(*args, **kwargs)
        finally:
            spent.append(time.process_time() - start)

    loop.train = train
    try:
        yield
    finally:
        del loop.train  # back to the class's method


def bench_time(tmp: Path, num_clients: int, reps: int, profile: bool) -> dict:
    fed = Federation(recipe_from_dict(recipe(tmp / "time", num_clients, num_clients)), tmp / "time")
    fed.start()
    clients = fed.participation.sampled(0)
    # Same batches: from x^t, the bare loop's first client must see the engine's first loss.
    x_0 = {k: t.clone() for k, t in fed.global_state.items()}
    engine_loss = next(s.train_loss for s in fed.run_round(0).stats if s.client == clients[0])  # the server moves on
    fed.adapter.load(fed.model, x_0)
    bare_loss = bare_round(fed, 0, clients[:1])[0]
    if abs(engine_loss - bare_loss) > 1e-5 * max(1.0, abs(engine_loss)):
        raise SystemExit(f"bare loop differs from the engine: loss {bare_loss} vs {engine_loss}")
    bare_round(fed, 0, clients)  # warm-up of both paths done; the rest is timed
    engine, bare, inside = {"wall": [], "cpu": []}, {"wall": [], "cpu": []}, []
    for i in range(reps):  # alternate, and swap who goes first, so drift hits both alike
        spent = []
        order = [(engine, lambda: fed.run_round(0)), (bare, lambda: bare_round(fed, 0, clients))]
        with clocked_local_round(fed, spent):
            for times, fn in order if i % 2 == 0 else order[::-1]:
                wall, cpu = time.perf_counter(), time.process_time()
                fn()
                times["wall"].append(time.perf_counter() - wall)
                times["cpu"].append(time.process_time() - cpu)
        inside.append(sum(spent))
    out = {
        "clients": num_clients, "steps_per_client": fed.recipe.client.max_steps, "reps": reps,
        "wall": summary(engine["wall"], bare["wall"], num_clients),
        "cpu": summary(engine["cpu"], bare["cpu"], num_clients),
    }
    if all(inside):
        out["split_cpu"] = {
            "local_round_s": inside,
            "local_round_over_bare": statistics.median(x / b for x, b in zip(inside, bare["cpu"])),
            "local_round_extra_ms_per_client": 1e3 * statistics.median(x - b for x, b in zip(inside, bare["cpu"])) / num_clients,
            "rest_of_round_ms_per_client": 1e3 * statistics.median(e - x for e, x in zip(engine["cpu"], inside)) / num_clients,
        }
    if profile:
        out["profile"] = {"engine": profiled(lambda: fed.run_round(0)), "bare": profiled(lambda: bare_round(fed, 0, clients))}
    return out


def profiled(fn, top: int = 30) -> str:
    profiler = cProfile.Profile()
    profiler.runcall(fn)
    text = io.StringIO()
    # the engine's own functions and the library calls it adds around training
    wanted = r"fedllm|bench|safetensors|module.py.*(train|named)|optim|clip_grad"
    pstats.Stats(profiler, stream=text).sort_stats("cumtime").print_stats(wanted, top)
    return text.getvalue()


# ---- (b) memory, each case in a fresh process --------------------------------------------
def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def memory_child(spec: dict) -> dict:
    """Runs in its own process: one round (+ eval, checkpoint, export) of `fed.run()`."""
    run_dir = Path(spec.pop("tmp")) / spec.pop("label")
    fed = Federation(recipe_from_dict(recipe(run_dir, **spec)), run_dir)
    fed.start()
    built = peak_rss_bytes()
    fed.run()
    store = fed.store
    # the store's RAM side (private: the store exposes no byte count)
    in_memory = sum(nbytes(state) for state in getattr(store, "_memory", {}).values())
    spilled = [p.stat().st_size for p in store.spill_dir.glob("client_*.safetensors")] if store.spill_dir.exists() else []
    return {
        "peak_rss": peak_rss_bytes(), "rss_after_build": built,
        "store_clients": len(store), "store_ram_bytes": in_memory,
        "store_spilled_files": len(spilled), "store_spilled_bytes": sum(spilled),
        "client_sizes": [min(fed.data.client_sizes), max(fed.data.client_sizes)],
    }


def run_child(spec: dict, threads: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--threads", str(threads), "--child", json.dumps(spec)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"memory child {spec} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_memory(tmp: Path, many: int, per_round: int, budget_mb: float, threads: int) -> dict:
    # max_length 256: with ~2 rows per client, a client must not lose its rows to truncation
    common = {"tmp": str(tmp), "per_round": per_round, "max_length": 256}
    one = run_child({**common, "label": "one", "num_clients": 1, "per_round": 1}, threads)
    stateless = run_child({**common, "label": "many", "num_clients": many}, threads)
    stateful = run_child({**common, "label": "many_stateful", "num_clients": many,
                          "keep_optimizer_state": True, "budget_mb": budget_mb}, threads)
    return {
        "one": one, "many": stateless, "many_stateful": stateful,
        "num_clients": many, "clients_per_round": per_round, "budget_mb": budget_mb,
        "ratio": stateless["peak_rss"] / one["peak_rss"],
        # "besides those states": the bytes the store keeps in RAM do not count against the goal
        "ratio_stateful": (stateful["peak_rss"] - stateful["store_ram_bytes"]) / one["peak_rss"],
    }


# ---- report ------------------------------------------------------------------------------
def verdict(value: float, goal: float) -> str:
    return f"{value:.3f}  (goal <= {goal}: {'PASS' if value <= goal else 'FAIL'})"


def per_client(case: dict) -> int:
    stored = case["store_ram_bytes"] + case["store_spilled_bytes"]
    return stored // case["store_clients"] if case["store_clients"] else 0


def report(results: dict) -> str:
    t, m, mib = results["time"], results["memory"], 2**20
    lines = [
        f"torch threads: {results['threads']}    torch {torch.__version__}",
        f"(a) engine overhead: 1 round, {t['clients']} clients x {t['steps_per_client']} local steps, {t['reps']} alternating reps",
        f"    {'clock':<6}{'engine med s':>13}{'bare med s':>12}{'+ms/client':>11}{'ratio med':>11}{'ratio min':>11}  median paired ratio",
        *[f"    {clock:<6}{c['engine_median_s']:>13.3f}{c['bare_median_s']:>12.3f}{c['per_client_overhead_ms']:>11.2f}"
          f"{c['ratio_of_medians']:>11.3f}{c['ratio_of_minimums']:>11.3f}  {verdict(c['median_paired_ratio'], TIME_GOAL)}"
          for clock, c in ((k, t[k]) for k in ("wall", "cpu"))],
        f"    wall s, engine: {[round(x, 2) for x in t['wall']['engine_s']]}",
        f"    wall s, bare:   {[round(x, 2) for x in t['wall']['bare_s']]}",
        f"(b) peak RSS, fresh process each, 1 round, {m['clients_per_round']} clients per round",
        f"    {'case':<40}{'peak MiB':>10}{'built MiB':>11}{'store RAM':>11}{'spilled':>18}",
    ]
    cases = [("1 client", m["one"]), (f"{m['num_clients']} clients, stateless", m["many"]),
             (f"{m['num_clients']} clients, optimizer state, {m['budget_mb']} MB", m["many_stateful"])]
    for name, c in cases:
        spilled = f"{c['store_spilled_bytes']} B/{c['store_spilled_files']} files"
        lines.append(f"    {name:<40}{c['peak_rss'] / mib:>10.1f}{c['rss_after_build'] / mib:>11.1f}"
                     f"{c['store_ram_bytes']:>9} B{spilled:>18}")
    lines += [
        f"    per-client state in the store: {per_client(m['many_stateful'])} B (AdamW moments of the LoRA tensors)",
        f"    rows per client at {m['num_clients']} clients: {m['many']['client_sizes'][0]}..{m['many']['client_sizes'][1]}",
        f"    ratio {m['num_clients']}/1 stateless            {verdict(m['ratio'], MEMORY_GOAL)}",
        f"    ratio {m['num_clients']}/1 stateful, minus store RAM {verdict(m['ratio_stateful'], MEMORY_GOAL)}",
    ]
    if "split_cpu" in t:
        sp = t["split_cpu"]
        lines[7:7] = [
            "    where the engine's extra time goes (cpu clock, median over reps, per client):",
            f"      inside local_round, beyond the bare steps  {sp['local_round_extra_ms_per_client']:6.2f} ms"
            f"   (local_round / bare = {sp['local_round_over_bare']:.3f})",
            f"      rest of run_round (load, store, hooks, serialize, checks, sum)  {sp['rest_of_round_ms_per_client']:6.2f} ms",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20 clients, 3 reps, 200 clients for memory")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions of each side")
    parser.add_argument("--profile", action="store_true", help="print cProfile of run_round and the bare loop")
    parser.add_argument("--out", type=Path, help="also write the results as JSON")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(memory_child(json.loads(args.child))))
        return
    clients, reps, many = (20, 3, 200) if args.quick else (100, 9, 1000)
    with tempfile.TemporaryDirectory(prefix="fedllm-bench-") as tmp:
        results = {"threads": args.threads, "quick": args.quick, "command": " ".join(sys.argv)}
        results["time"] = bench_time(Path(tmp), clients, args.reps or reps, args.profile)
        results["memory"] = bench_memory(Path(tmp), many, per_round=10, budget_mb=0.1, threads=args.threads)
    print(report(results))
    for side, text in results["time"].get("profile", {}).items():
        print(f"\n---- cProfile: {side} (cumulative, engine-side rows) ----\n{text}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

"""Checkpoint bytes written per round, incremental vs writing every client anew, measured
side by side in one run on the real engine (CPU, about a minute).

A federation of N clients (10, 100, 1000) with per-client state (AdamW moments kept between
a client's rounds: `client.keep_optimizer_state`), 10 clients per round, a checkpoint after
every round. After round 1 every client holds a state (a copy of a trained one), as in a
long run where all clients have trained at least once. For each N the same run is done twice: with fedllm's incremental checkpoints
(clients unchanged since the last checkpoint are hard links) and with every client's file
written again (`incremental=False`, how checkpoints were written before). The goal: bytes
written per checkpoint proportional to the clients that trained since the last one, not to
all clients that ever had state, i.e. flat in N for the incremental writer.

    python bench/checkpoint_bytes.py [--clients 10,100,1000] [--rounds 6] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

import fedllm.engine as engine
from fedllm.engine import Federation
from fedllm.recipe import recipe_from_dict
from fedllm.state import write_checkpoint

PER_ROUND = 10


def recipe(run_dir: Path, num_clients: int, rounds: int) -> dict:
    return {
        "seed": 0,
        "model": {"name": "tiny-llama"},
        "data": {"path": "bundled:quickstart", "format": "dolly", "max_length": 256,
                 "eval_fraction": 0.01, "partitioner": {"name": "iid"}},
        "adapter": {"name": "lora"},
        "strategy": {"name": "fedavg"},
        "federation": {"rounds": rounds, "num_clients": num_clients, "clients_per_round": PER_ROUND},
        "client": {"max_steps": 1, "per_device_train_batch_size": 2, "keep_optimizer_state": True},
        "eval": {"every": 0, "max_batches": 1},
        "output": {"dir": str(run_dir.parent), "name": run_dir.name, "progress": False,
                   "checkpoint_every": 1, "keep_last": 2},
    }


class LongRunning(Federation):
    """After the first round, every client has a state, as after many rounds."""

    def run_round(self, t, progress=None):
        result = super().run_round(t, progress)
        if t == 0:
            trained = self.store.get(self.store.ids()[0])
            for client_id in range(self.recipe.federation.num_clients):
                if client_id not in self.store:
                    self.store.put(client_id, {k: v.clone() for k, v in trained.items()})
        return result


def one_run(tmp: Path, num_clients: int, rounds: int, incremental: bool) -> dict:
    """Runs the federation, recording what every checkpoint write cost."""
    costs = []

    def recorded(*args, **kwargs):
        start = time.perf_counter()
        cost = write_checkpoint(*args, **kwargs, incremental=incremental)
        costs.append((cost, time.perf_counter() - start))
        return cost

    run_dir = tmp / f"n{num_clients}-{'incremental' if incremental else 'full'}"
    engine.write_checkpoint = recorded
    try:
        fed = LongRunning(recipe_from_dict(recipe(run_dir, num_clients, rounds)), run_dir)
        fed.start()
        fed.run()
    finally:
        engine.write_checkpoint = write_checkpoint
    later = costs[1:]  # the first checkpoint has nothing to link to
    return {
        "clients_with_state": len(fed.store),
        "bytes_per_checkpoint": statistics.mean(c.bytes_written for c, _ in later),
        "seconds_per_checkpoint": statistics.mean(s for _, s in later),
        "files_linked": statistics.mean(c.files_linked for c, _ in later),
        "client_state_bytes": sum(p.stat().st_size for p in (costs[-1][0].path / "clients").iterdir()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="10,100,1000")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("fedllm").setLevel(logging.WARNING)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(x) for x in args.clients.split(",")):
            results[n] = {kind: one_run(Path(tmp), n, args.rounds, kind == "incremental") for kind in ("incremental", "full")}
    header = (f"{'clients':>8} {'with state':>10} {'incremental B/ckpt':>19} {'full B/ckpt':>12} {'full/incr':>9}"
              f" {'incr s':>7} {'full s':>7} {'linked':>7}")
    print(f"checkpoint after every round, {PER_ROUND} clients per round, {args.rounds} rounds; mean over checkpoints 2..")
    print(header)
    for n, r in results.items():
        inc, full = r["incremental"], r["full"]
        print(f"{n:>8} {inc['clients_with_state']:>10} {inc['bytes_per_checkpoint']:>19,.0f} {full['bytes_per_checkpoint']:>12,.0f}"
              f" {full['bytes_per_checkpoint'] / inc['bytes_per_checkpoint']:>9.1f} {inc['seconds_per_checkpoint']:>7.3f}"
              f" {full['seconds_per_checkpoint']:>7.3f} {inc['files_linked']:>7.0f}")
    small, large = results[min(results)]["incremental"], results[max(results)]["incremental"]
    growth = large["bytes_per_checkpoint"] / small["bytes_per_checkpoint"]
    print(f"incremental bytes per checkpoint, {max(results)} vs {min(results)} clients: {growth:.2f}x "
          f"(goal: ~1, flat in the number of clients) -> {'PASS' if growth < 1.5 else 'FAIL'}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

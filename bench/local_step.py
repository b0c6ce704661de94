"""The local step's two speed options, measured side by side in one run (CPU, a few minutes):
`client.fused_optimizer` (one fused AdamW kernel) and `client.torch_compile` (torch.compile of
the model's forward and backward), against the plain eager step with the for-loop AdamW.

One Federation on the quickstart data; every variant runs the same round (same clients, same
batches) in turn, after a warm-up round that pays torch.compile's compilation. Times are CPU
seconds of this process (robust to other load on a shared machine) and wall seconds; ratios
are eager / variant (above 1: the variant is faster).

    python bench/local_step.py [--reps 3] [--clients 4] [--steps 10] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fedllm.engine import Federation
from fedllm.recipe import recipe_from_dict

VARIANTS = {  # name -> client options
    "eager": {"fused_optimizer": False, "torch_compile": False},
    "fused": {"fused_optimizer": True, "torch_compile": False},
    "fused+compile": {"fused_optimizer": True, "torch_compile": True},
}


def recipe(run_dir: Path, clients: int, steps: int) -> dict:
    return {
        "seed": 0,
        "model": {"name": "tiny-llama"},
        "data": {"path": "bundled:quickstart", "format": "dolly", "max_length": 224, "eval_fraction": 0.01,
                 "partitioner": {"name": "iid"}},
        "adapter": {"name": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"},
        "strategy": {"name": "fedavg"},
        "federation": {"rounds": 1, "num_clients": clients, "clients_per_round": clients},
        "client": {"max_steps": steps, "per_device_train_batch_size": 8, "learning_rate": 0.005},
        "eval": {"max_batches": 1},
        "output": {"dir": str(run_dir.parent), "name": run_dir.name, "progress": False, "checkpoints": False},
    }


def use(fed: Federation, options: dict) -> None:
    for key, value in options.items():
        setattr(fed.recipe.client, key, value)


def timed_round(fed: Federation) -> tuple[float, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    stats = fed.run_round(0).stats
    return time.perf_counter() - wall, time.process_time() - cpu, statistics.mean(s.train_loss for s in stats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fed = Federation(recipe_from_dict(recipe(Path(tmp) / "run", args.clients, args.steps)), Path(tmp) / "run")
        fed.start()
        times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in VARIANTS}
        losses, warmup = {}, {}
        for name, options in VARIANTS.items():  # warm-up: compilation happens here
            use(fed, options)
            warmup[name] = timed_round(fed)[0]
        for i in range(args.reps):  # alternate the order so drift hits every variant alike
            for name in (list(VARIANTS) if i % 2 == 0 else list(VARIANTS)[::-1]):
                use(fed, VARIANTS[name])
                wall, cpu, loss = timed_round(fed)
                times[name]["wall"].append(wall)
                times[name]["cpu"].append(cpu)
                losses[name] = loss
    base = {k: statistics.median(v) for k, v in times["eager"].items()}
    rows = {name: {"warmup_wall_s": warmup[name], "wall_s": statistics.median(t["wall"]), "cpu_s": statistics.median(t["cpu"]),
                   "speedup_wall": base["wall"] / statistics.median(t["wall"]),
                   "speedup_cpu": base["cpu"] / statistics.median(t["cpu"]), "mean_train_loss": losses[name]}
            for name, t in times.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clients} clients x {args.steps} steps, "
          f"median of {args.reps}")
    print(f"{'variant':<15}{'warm-up s':>10}{'wall s':>9}{'cpu s':>9}{'eager/x wall':>14}{'eager/x cpu':>13}{'train loss':>12}")
    for name, row in rows.items():
        print(f"{name:<15}{row['warmup_wall_s']:>10.1f}{row['wall_s']:>9.2f}{row['cpu_s']:>9.2f}"
              f"{row['speedup_wall']:>14.2f}{row['speedup_cpu']:>13.2f}{row['mean_train_loss']:>12.5f}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

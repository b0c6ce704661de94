"""Zeroth-order clients (`client.optim: zo`, MeZO) against AdamW: (1) the peak memory one
client's local round adds on top of the resident model, beside the peak of forward passes
alone on the same batches (inference), goal zo ≤ inference + 10%; (2) the eval loss each
reaches on the quickstart recipe in the same wall time.

(1) runs each setting in a fresh process on a bigger random Llama (bench-llama, built
locally; LoRA r=16 on all linear layers, batch 8 × 192 tokens): one forward pass as warm-up,
freed heap handed back (malloc_trim), the kernel's peak-RSS mark reset (/proc/self/clear_refs),
then one client's local round (10 steps) or the same batches' forward passes under no_grad;
reported: peak resident set minus the resident set before. A fixed glibc mmap threshold
keeps freed tensors from lingering in the heap (see bench/ferret_memory.py).
(2) runs `recipes/quickstart.yaml` (AdamW) and the same with client.optim=zo (the recipe
`recipes/zeroth_order.yaml`'s client settings) for `--seconds` each, whole rounds until the
budget is spent, then evaluates the global model on the held-out set.

    python bench/zo_memory.py [--seconds 120] [--width 512 --layers 4] [--skip-time]

Measured here (2 CPU cores shared with ~6 other sessions, torch 2.13, `--seconds 150`):

    (1) bench-llama 512×4 (52.4 MB of weights, LoRA 2.41 MB), 10 steps × batch 8 × 192 tokens
        inference    69.4 MB   1.00×      zo    74.9 MB   1.08× → goal ≤ 1.10 met
        adamw       261.5 MB   3.77×
    (2) quickstart: adamw 3 rounds in 153 s, eval loss 3.62; zo (50 steps/round, lr 1e-4,
        ε 1e-2) 2 rounds in 245 s (whole rounds: its first ended past the budget), eval loss
        5.95 — from 6.0 at the start: zeroth-order steps buy memory, not speed.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
ZO = ["client.optim=zo", "client.zo_eps=0.01", "client.max_steps=50", "client.learning_rate=0.0001",
      "client.lr_scheduler_type=constant", "client.max_grad_norm=null"]
FIXED_MMAP = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
MEMORY_SETTINGS = {"inference": ["client.optim=zo"], "zo": ["client.optim=zo"], "adamw": []}


def status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def one_memory(setting: str, width: int, layers: int) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    import numpy as np
    import torch
    from ferret_reconstruct import bigger_llama

    from fedllm import models
    from fedllm.data import collate
    from fedllm.engine import Federation
    from fedllm.recipe import load_recipe
    from fedllm.state import ClientRecord
    from fedllm.training import client_seed, micro_batches

    torch.set_num_threads(1)
    models.PRESETS["bench-llama"] = bigger_llama(width, layers)
    common = ["model.name=bench-llama", "output.progress=false", "eval.every=0", "client.max_steps=10"]
    with tempfile.TemporaryDirectory() as tmp:
        fed = Federation(load_recipe(QUICKSTART, common + MEMORY_SETTINGS[setting]), Path(tmp) / "run")
        cfg, examples = fed.recipe.client, fed.data.clients[0]
        batches = list(micro_batches(examples, cfg.per_device_train_batch_size, cfg.max_steps,
                                     np.random.default_rng(client_seed(fed.recipe.seed, 0, 0))))
        inputs = [{k: v.to(fed.device) for k, v in collate(b, fed.pad_token_id).items()} for b in batches]
        with torch.no_grad():
            fed.model.eval()
            fed.model(**inputs[0])  # warm-up, the same for every setting
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak resident set (VmHWM)
        before = status("VmRSS")
        start = time.perf_counter()
        if setting == "inference":
            with torch.no_grad():
                for batch in inputs:
                    fed.model(**batch)
        else:
            fed.client.run(0, 0, fed.global_state, {}, ClientRecord(), cfg.learning_rate)
        seconds = time.perf_counter() - start
        peak = status("VmHWM")
        trainable = sum(p.numel() * p.element_size() for p in fed.params.values())
        weights = sum(p.numel() * p.element_size() for p in fed.model.parameters())
        return {"added": peak - before, "trainable": trainable, "weights": weights, "seconds": seconds}


def one_timed(overrides: list[str], seconds: float) -> dict:
    import torch

    from fedllm.engine import Federation
    from fedllm.recipe import load_recipe

    torch.set_num_threads(1)
    common = ["output.progress=false", "eval.every=0", "federation.rounds=1000", "output.checkpoint_every=0"]
    with tempfile.TemporaryDirectory() as tmp:
        fed = Federation(load_recipe(QUICKSTART, common + overrides), Path(tmp) / "run")
        start, rounds, losses = time.perf_counter(), 0, []
        while time.perf_counter() - start < seconds:
            result = fed.run_round(rounds)
            fed.global_state, fed.server_state = result.global_state, result.server_state
            losses.append(sum(s.train_loss for s in result.stats) / len(result.stats))
            rounds += 1
        spent = time.perf_counter() - start
        final = fed.evaluate(fed.data.eval)
        return {"rounds": rounds, "seconds": spent, "eval_loss": final["eval_loss"], "first_train_loss": losses[0],
                "last_train_loss": losses[-1]}


def run_child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=FIXED_MMAP,
                         cwd=ROOT)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="wall-time budget per optimizer in (2)")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--skip-time", action="store_true", help="only (1), the memory comparison")
    parser.add_argument("--memory", help=argparse.SUPPRESS)  # internal: one memory setting, print JSON
    parser.add_argument("--timed", help=argparse.SUPPRESS)  # internal: zo|adamw for --seconds, print JSON
    args = parser.parse_args()
    if args.memory:
        print(json.dumps(one_memory(args.memory, args.width, args.layers)))
        return
    if args.timed:
        print(json.dumps(one_timed(ZO if args.timed == "zo" else [], args.seconds)))
        return
    size = ["--width", str(args.width), "--layers", str(args.layers)]
    memory = {name: run_child(["--memory", name, *size]) for name in MEMORY_SETTINGS}
    base = memory["inference"]["added"]
    print(f"(1) peak memory one client's round adds (bench-llama {args.width}×{args.layers}, "
          f"weights {memory['zo']['weights'] / 2**20:.1f} MB, LoRA {memory['zo']['trainable'] / 2**20:.2f} MB, "
          f"10 steps × batch 8 × 192 tokens)")
    for name, m in memory.items():
        print(f"    {name:10} {m['added'] / 2**20:9.1f} MB   {m['added'] / base:6.2f} × inference   {m['seconds']:6.1f} s")
    verdict = "PASS" if memory["zo"]["added"] <= 1.1 * base else "FAIL"
    print(f"    goal zo ≤ 1.10 × inference: {memory['zo']['added'] / base:.2f} → {verdict}")
    if args.skip_time:
        return
    print(f"(2) quickstart, {args.seconds:.0f} s of wall time each (whole rounds), eval loss of the global model")
    for name in ("adamw", "zo"):
        r = run_child(["--timed", name, "--seconds", str(args.seconds)])
        print(f"    {name:6} rounds {r['rounds']:3d} in {r['seconds']:6.1f} s   train loss {r['first_train_loss']:.3f} → "
              f"{r['last_train_loss']:.3f}   eval loss {r['eval_loss']:.4f}")


if __name__ == "__main__":
    main()

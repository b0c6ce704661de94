"""DP-SGD per-example gradients: one backward per example (the loop) vs torch.func's
vmap(grad(...)), side by side in one run on a LoRA tiny-llama (CPU, ~1 minute).

For each batch size, both paths compute the same clipped sum Σ_i clip(∇ℓ_i, C) on the same
right-padded micro-batch (`fedllm.privacy.dp_sgd.looped_clipped_sum` and
`vectorized_clipped_sum`); the script checks they agree, then times them alternately.

    python bench/dp_sgd_vmap.py [--batches 4,8,16] [--reps 5] [--length 96]
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fedllm.data.tokenize import collate
from fedllm.models import build_model
from fedllm.privacy.dp_sgd import looped_clipped_sum, vectorized_clipped_sum
from fedllm.recipe import recipe_from_dict
from fedllm.training import ModelLoss


def batch_of(size: int, length: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(length // 2, length + 1, (size,), generator=gen).tolist()
    examples = []
    for n in lengths:
        ids = torch.randint(5, 100, (n,), generator=gen).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:]})
    return collate(examples, pad_token_id=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="4,8,16")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--length", type=int, default=96)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        recipe = recipe_from_dict({
            "model": {"name": "tiny-llama"}, "data": {"path": "bundled:quickstart"},
            "adapter": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
            "output": {"dir": tmp},
        })
        _, model, adapter = build_model(recipe, torch.device("cpu"))
    model.train()
    params, loss_of = adapter.trainable(model), ModelLoss(model, contextlib.nullcontext())
    print(f"LoRA r=16 all-linear on tiny-llama: {sum(p.numel() for p in params.values()):,} trainable; "
          f"tokens per example {args.length // 2}-{args.length}; median of {args.reps} reps")
    print(f"{'batch':>6} {'loop s':>8} {'vmap s':>8} {'loop/vmap':>10} {'max |diff|':>11}")
    for size in (int(b) for b in args.batches.split(",")):
        batch = batch_of(size, args.length, seed=size)
        loop, _, _ = looped_clipped_sum(params, batch, loss_of, clip=0.1)
        vmap, _, _ = vectorized_clipped_sum(params, batch, loss_of, clip=0.1)  # also warms torch.func up
        diff = max(float((loop[k] - vmap[k]).abs().max()) for k in loop)
        times = {"loop": [], "vmap": []}
        for rep in range(args.reps):
            order = [("loop", looped_clipped_sum), ("vmap", vectorized_clipped_sum)]
            for name, fn in order if rep % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                fn(params, batch, loss_of, clip=0.1)
                times[name].append(time.perf_counter() - start)
        lo, vm = statistics.median(times["loop"]), statistics.median(times["vmap"])
        print(f"{size:>6} {lo:>8.3f} {vm:>8.3f} {lo / vm:>10.2f} {diff:>11.2e}")


if __name__ == "__main__":
    main()

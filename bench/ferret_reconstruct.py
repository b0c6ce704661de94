"""Ferret's projection and reconstruction cost per round against local training, measured
on the same model inside the engine's own `run_round` (CPU: about a minute).

For each adapter setting it runs rounds of recipes/ferret_quickstart.yaml and times, summed
over the round's clients: local training (the loop's `train`), projection (`adapter.encode`) and
reconstruction (`adapter.apply_broadcast`, once per round on the compact path; `decode` per
client otherwise), plus the bases really generated. Goal: reconstruction <
local training.

    python bench/ferret_reconstruct.py [--rounds N] [--threads N] [--width W --layers L] [key=value ...]

`--width/--layers` swap the tiny preset for a bigger random Llama (built locally, nothing is
downloaded); `key=value` are recipe overrides applied to every setting.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fedllm.adapters.ferret  # noqa: F401
from fedllm import models
from fedllm.engine import Federation
from fedllm.recipe import load_recipe

RECIPE = Path(__file__).parents[1] / "recipes" / "ferret_quickstart.yaml"
SETTINGS = {  # adapter overrides compared side by side
    "K=4, per-client seeds (quickstart)": [],
    "K=200, per-client seeds (paper)": ["adapter.k=200"],
    "K=200, official scaling, shared pool": ["adapter.k=200", "adapter.scaling=official", "adapter.seed_pool=shared"],
}


def bigger_llama(width: int, layers: int):
    def build(vocab_size, pad_id, bos_id, eos_id):
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab_size, hidden_size=width, intermediate_size=int(2.75 * width), num_hidden_layers=layers,
            num_attention_heads=max(1, width // 64), num_key_value_heads=max(1, width // 64), max_position_embeddings=1024,
            pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id, tie_word_embeddings=False,
        ))

    return build


def timed(fn, clock: dict, key: str):
    def wrapper(*args, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        clock[key] += time.perf_counter() - start
        return out

    return wrapper


def measure(overrides: list[str], rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        fed = Federation(load_recipe(RECIPE, overrides), Path(tmp) / "run")
        clock = defaultdict(float)
        fed.adapter.encode = timed(fed.adapter.encode, clock, "project")
        # reconstruction: once per round in coordinate space (compact path), else per client
        fed.adapter.apply_broadcast = timed(fed.adapter.apply_broadcast, clock, "reconstruct")
        fed.adapter.decode = timed(fed.adapter.decode, clock, "reconstruct")
        fed.client.loop.train = timed(fed.client.loop.train, clock, "train")  # what Client.run calls
        for t in range(rounds):
            result = fed.run_round(t)
            fed.global_state = result.global_state
            clock["round"] += result.seconds
        params = sum(p.numel() for p in fed.params.values())
        per_round = {k: v / rounds for k, v in clock.items()}
        return {**per_round, "params": params, "bases": fed.adapter.bases.generated / rounds,
                "bytes": result.stats[0].bytes_up, "clients": len(result.stats)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 gives stable timings on a busy machine)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    common = ["output.progress=false", "eval.every=0", *args.overrides]
    if args.width:
        models.PRESETS["bench-llama"] = bigger_llama(args.width, args.layers)
        common.append("model.name=bench-llama")
    print(f"{'setting':40} {'train s':>8} {'project s':>10} {'reconstr. s':>12} {'reconstr./train':>16} {'bases/round':>12} {'bytes up':>9}")
    for name, extra in SETTINGS.items():
        m = measure(common + extra, args.rounds)
        print(f"{name:40} {m['train']:8.2f} {m['project']:10.3f} {m['reconstruct']:12.3f} "
              f"{m['reconstruct'] / m['train']:16.3f} {m['bases']:12.0f} {m['bytes']:9.0f}")
    print(f"(per round: {m['clients']} clients, {m['params']:,} trainable parameters, "
          f"{torch.get_num_threads()} threads, device {'cuda' if torch.cuda.is_available() else 'cpu'}; goal reconstr./train < 1)")


if __name__ == "__main__":
    main()

"""Peak memory a federated round adds on top of the resident model, in units of the
trainable parameters' bytes, for Ferret's compact path (aggregation in coordinate space,
DESIGN §5: one extra copy of the trainable tensors), Ferret decoded per client (the engine's
generic path) and full-parameter FedAvg, side by side (CPU, about a minute).

Each setting runs in a fresh process on a bigger random Llama (built locally): one warm-up
round, then the kernel's peak-RSS mark is reset (/proc/self/clear_refs) and one more round
is measured. Before it, freed heap is handed back (malloc_trim), so the resident set is what
is live: the model, the global copy x^t, the engine's state; what the round adds is local training (activations, the
gradients: one more parameter-sized buffer for any first-order method) plus whatever the
engine materialises per client and at aggregation.

    python bench/ferret_memory.py [--width 512 --layers 4]

Measured here (2 shared cores, torch 2.13 CPU, 13.1M trainable parameters = 50 MB, one
process per setting with the fixed mmap threshold; full FedAvg twice: 315.6 / 316.1 MB):

    setting                                       trainable MB  round adds MB  × trainable
    ferret K=200, compact, no basis cache                 50.0           52.3         1.04
    ferret K=200, compact                                 50.0           52.2         1.04
    ferret K=200, decoded per client, no cache            50.0          253.9         5.07
    full-parameter FedAvg                                 50.0          301.0         6.02

The compact path adds the gradients (1.0×) and block-sized temporaries, nothing else; the
basis cache (`adapter.cache_mb`, default 256 MB) is held across rounds, so it sits in the
baseline rather than in what a round adds. Without the fixed threshold the same settings
read 1.9–7.9× (compact) from run to run: glibc fragmentation, not live tensors.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SETTINGS = {  # cache_mb=0: no bases kept between projection and reconstruction (the default keeps ≤ 256 MB)
    "ferret K=200, compact, no basis cache": (["adapter.name=ferret", "adapter.k=200", "adapter.cache_mb=0"], True),
    "ferret K=200, compact": (["adapter.name=ferret", "adapter.k=200"], True),
    "ferret K=200, decoded per client, no cache": (["adapter.name=ferret", "adapter.k=200", "adapter.cache_mb=0"], False),
    "full-parameter FedAvg": (["adapter={name: full}"], True),
}


# glibc raises its mmap threshold as large blocks are freed, after which freed tensors stay
# in the heap and the resident set measures fragmentation, not live memory (run-to-run 2-8×
# here). A fixed threshold keeps every tensor over 128 KiB in its own mapping, returned on free.
FIXED_MMAP = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}


def status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def one_setting(overrides: list[str], compact: bool, width: int, layers: int) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    import torch
    from ferret_reconstruct import RECIPE, bigger_llama

    from fedllm import models
    from fedllm.engine import Federation
    from fedllm.recipe import load_recipe

    torch.set_num_threads(1)
    models.PRESETS["bench-llama"] = bigger_llama(width, layers)
    common = ["model.name=bench-llama", "output.progress=false", "eval.every=0", "client.max_steps=2",
              "client.per_device_train_batch_size=2", "data.max_length=64", "federation.clients_per_round=3"]
    with tempfile.TemporaryDirectory() as tmp:
        fed = Federation(load_recipe(RECIPE, common + overrides), Path(tmp) / "run")
        if not compact:  # the generic path: every client decoded
            fed.own_aggregation = None
        params = sum(p.numel() * p.element_size() for p in fed.params.values())
        fed.global_state = fed.run_round(0).global_state  # warm-up
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back: the baseline is what is live
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak resident set (VmHWM)
        before = status("VmRSS")
        fed.global_state = fed.run_round(1).global_state
        peak = status("VmHWM")
        return {"params_bytes": params, "added": peak - before, "compact": fed.own_aggregation is not None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3, help="processes per setting (the median is reported)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one setting, print JSON
    args = parser.parse_args()
    if args.one:
        overrides, compact = SETTINGS[args.one]
        print(json.dumps(one_setting(overrides, compact, args.width, args.layers)))
        return
    print(f"{'setting':44} {'trainable MB':>13} {'round adds MB (median)':>23} {'× trainable':>12} {'range ×':>12}")
    for name in SETTINGS:
        runs = []
        for _ in range(args.repeat):  # a fresh process each time; RSS peaks vary from run to run
            out = subprocess.run([sys.executable, __file__, "--one", name, "--width", str(args.width), "--layers", str(args.layers)],
                                 capture_output=True, text=True, check=True, env=FIXED_MMAP)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        size = runs[0]["params_bytes"]
        added = sorted(m["added"] for m in runs)
        median = added[len(added) // 2]
        print(f"{name:44} {size / 2**20:13.1f} {median / 2**20:23.1f} {median / size:12.2f} "
              f"{added[0] / size:5.2f}–{added[-1] / size:<5.2f}")
    print(f"(one round of 3 clients × 2 SGD steps, {args.repeat} processes per setting; gradients alone account for 1.0×)")


if __name__ == "__main__":
    main()

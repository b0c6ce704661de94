"""Peak resident memory per rank while a client group of 2 ranks loads and shards its base
(federation.group_parallel=fsdp), for federation.fsdp_load=every_rank (every rank builds the
whole base, then shards it) and =leader (only the leader builds it; the other rank builds it
on the meta device and receives its shard). The base: a random Llama checkpoint of about
--mib MiB (fp32), loaded through from_pretrained like a real one. Each rank's peak is its
VmHWM after loading, counted from its RSS just before (the model's modules already imported);
one torch thread per rank.

    python bench/meta_load.py [--mib 200] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "engine" / "meta_load_worker.py"
LAYERS, HEADS = 4, 4


def shape_for(mib: float) -> tuple[int, int]:
    """(hidden, intermediate) of a LAYERS-layer Llama with intermediate = 2.75·hidden and
    about `mib` MiB of fp32 parameters (the 259-token embeddings and head are negligible)."""
    per_hidden_squared = LAYERS * (4 + 3 * 2.75) * 4  # bytes per hidden² over the decoder layers
    hidden = int((mib * 2**20 / per_hidden_squared) ** 0.5) // 64 * 64
    return hidden, int(2.75 * hidden) // 16 * 16


def run(cmd: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])


def measure(base: Path, mode: str, work: Path) -> list[dict]:
    recipe = {
        "seed": 0, "model": {"name": str(base)},
        "data": {"path": "bundled:quickstart", "max_samples": 64, "max_length": 64},
        "adapter": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "federation": {"rounds": 1, "num_clients": 2, "clients_per_round": 2, "group_size": 2,
                       "group_parallel": "fsdp", "fsdp_load": mode},
        "output": {"dir": str(work / "runs")},
    }
    path = work / f"{mode}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
         "--master_port=29581", str(WORKER), "memory", str(work / mode), str(path)])
    return [json.loads((work / mode / f"rank{r}.json").read_text()) for r in range(2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=float, default=200.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    hidden, intermediate = shape_for(args.mib)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        run([sys.executable, str(WORKER), "checkpoint", str(work / "base"), str(hidden), str(intermediate), str(LAYERS)])
        rows = {mode: measure(work / "base", mode, work) for mode in ("every_rank", "leader")}
    whole = rows["leader"][0]["whole_parameter_bytes"] / 2**20
    print(f"base: Llama, hidden {hidden}, intermediate {intermediate}, {LAYERS} layers: {whole:.1f} MiB of parameters; "
          "1 group of 2 ranks (gloo, CPU)")
    print("| fsdp_load | rank | peak RSS at load, MiB | rise while loading, MiB | rise / base | parameters held, MiB |")
    print("|---|---|---:|---:|---:|---:|")
    for mode, ranks in rows.items():
        for r in ranks:
            rise = (r["peak_kib"] - r["rss_before_kib"]) / 1024
            role = "leader" if r["leader"] else "other"
            print(f"| {mode} | {r['rank']} ({role}) | {r['peak_kib'] / 1024:.0f} | {rise:.0f} | {rise / whole:.2f} | "
                  f"{r['held_parameter_bytes'] / 2**20:.1f} |")
    if args.out:
        args.out.write_text(json.dumps({"hidden": hidden, "intermediate": intermediate, "layers": LAYERS, **rows}, indent=1))


if __name__ == "__main__":
    main()

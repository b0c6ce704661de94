"""Behaviour must not change across a refactor: runs a fixed set of recipes (CPU, one
thread, 3 rounds each, plus a 2-rank torchrun quickstart), a transformers Trainer with
FederatedCallback (bench/trainer_run.py) and a deployed run through the ServerApp's entry
point with a stand-in Flower Grid (bench/deployed_run.py), and compares the sha256 of every
`final/*.safetensors`, of `metrics.jsonl` (timings removed) and of `ledger.jsonl` with a
reference recorded on an earlier commit.

    python bench/identical_runs.py --record bench/identical_runs.json   # on the old commit
    python bench/identical_runs.py --check  bench/identical_runs.json   # after the change
    python bench/identical_runs.py --check ... --only quickstart,ferret_quickstart

Prints one line per run (same / DIFFERENT, with the first differing file) and exits 1 on
any difference. Bit-identity holds for one machine and torch build: record and check on
the same one.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMING_KEYS = {"seconds", "time", "wall_seconds"}  # keys of a metrics row that measure time, not results

RECIPE_RUNS = {  # name -> (recipe, extra overrides, ranks)
    "quickstart": ("quickstart.yaml", [], 1),
    "ferret_quickstart": ("ferret_quickstart.yaml", [], 1),
    "wara_quickstart": ("wara_quickstart.yaml", [], 1),
    "sfprompt_quickstart": ("sfprompt_quickstart.yaml", [], 1),
    "scaffold": ("scaffold.yaml", [], 1),
    "dp_fedavg": ("dp_fedavg.yaml", ["privacy.noise_seed=1234"], 1),
    "fedzip": ("fedzip.yaml", [], 1),
    "byzantine_quickstart": ("byzantine_quickstart.yaml", [], 1),
    "async": ("async_quickstart.yaml", [], 1),
    "buffered": ("buffered_quickstart.yaml", [], 1),
    "quickstart_2ranks": ("quickstart.yaml", [], 2),
}
SCRIPT_RUNS = {  # name -> a bench script that takes the run's output directory (its own fixed setting)
    "trainer_callback": "trainer_run.py",
    "deployed": "deployed_run.py",
}
RUNS = [*RECIPE_RUNS, *SCRIPT_RUNS]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def same_number(value):
    """A whole float as the int it equals: the values are compared, not their JSON spelling (a
    byte count logged as 9248.0 by one version and 9248 by another is the same result)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def metrics_digest(path: Path) -> str:
    rows = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        rows.append({k: same_number(v) for k, v in row.items() if k not in TIMING_KEYS})
    return sha256(json.dumps(rows, sort_keys=True).encode())


def digest_run(run_dir: Path) -> dict[str, str]:
    out = {f"final/{p.name}": sha256(p.read_bytes()) for p in sorted((run_dir / "final").glob("*.safetensors"))}
    out["metrics.jsonl"] = metrics_digest(run_dir / "metrics.jsonl")
    ledger = run_dir / "ledger.jsonl"
    if ledger.exists():
        out["ledger.jsonl"] = sha256(ledger.read_bytes())
    return out


def command(name: str, out: Path) -> list[str]:
    if name in SCRIPT_RUNS:
        return [sys.executable, str(ROOT / "bench" / SCRIPT_RUNS[name]), str(out)]
    recipe, extra, ranks = RECIPE_RUNS[name]
    args = [str(ROOT / "recipes" / recipe), "federation.rounds=3", f"output.dir={out.parent}",
            f"output.name={out.name}", "output.progress=false", *extra]
    if ranks == 1:
        return [sys.executable, "-m", "fedllm", "run", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", "29533",
            str(ROOT / "scripts" / "train.py"), *args]


def run_one(name: str, scratch: Path) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command(name, scratch / name), cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return digest_run(scratch / name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--record", metavar="JSON")
    mode.add_argument("--check", metavar="JSON")
    parser.add_argument("--only", default="", help="comma-separated run names (default: all)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (each uses one thread; torchrun two)")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(RUNS)
    unknown = set(names) - set(RUNS)
    if unknown:
        parser.error(f"unknown run(s) {sorted(unknown)}; known: {', '.join(RUNS)}")
    with tempfile.TemporaryDirectory(prefix="fedllm-identical-") as scratch:
        with ThreadPoolExecutor(args.jobs) as pool:
            digests = dict(zip(names, pool.map(lambda n: run_one(n, Path(scratch)), names)))
    if args.record:
        Path(args.record).write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")
        print(f"recorded {len(digests)} runs in {args.record}")
        return 0
    reference = json.loads(Path(args.check).read_text())
    failed = 0
    for name, got in digests.items():
        want = reference.get(name)
        if want is None:
            print(f"{name:24s} no reference")
            failed += 1
            continue
        differing = [f for f in sorted(set(want) | set(got)) if want.get(f) != got.get(f)]
        print(f"{name:24s} {'same' if not differing else 'DIFFERENT: ' + ', '.join(differing)}")
        failed += bool(differing)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Federations on a simulated clock (fedllm.asynchrony), on the quickstart data (CPU).

(a) eval loss against simulated time for sync, async (FedAsync) and buffered (FedBuff) on
    lognormal devices; goal: buffered reaches the sync run's final eval loss in ≤ 0.6× the
    sync run's simulated time.
(b) mixed-rank FlexLoRA (ranks by device tier) against uniform-rank LoRA at about the same
    uplink bytes (the ledger's real serialized bytes).
    Also FlexLoRA at one uniform rank (a control: product averaging alone), FlexLoRA with
    `flexlora_mean: changes`, and the share of the global ΔW's energy each round keeps
    (averaging the products forgets the components low-rank clients cannot hold).
(c) Wang & Gao's intertwined setting (the slow devices alone hold some categories): sync
    FedAvg against FedAsync and FedBuff staleness weighting.
(d) devices that come and go, with slow links: sync against FedBuff on the same churn.

    python bench/async_rounds.py                 # all four (over an hour on 2 busy shared cores, --workers 3)
    python bench/async_rounds.py --only b --rounds 8 --out /tmp/async.json
Every run is `fedllm run` in a subprocess with OMP_NUM_THREADS=1; run directories go to a
temp dir (kept with --keep)."""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
DEVICES = "federation.devices={profile: lognormal, sigma: 1.0, tokens_per_second: 1000}"
EVERY_ROUND = ["eval.every=1", "output.checkpoint_every=0", "output.progress=false"]

# name -> (recipe, overrides)
TIMED = {
    "sync": ("quickstart.yaml", [DEVICES]),
    "async": ("async_quickstart.yaml", []),
    # FedBuff needs more server versions than sync to make up for stale, down-weighted
    # updates: twice the arrivals, which its concurrency delivers in less simulated time
    "buffered": ("buffered_quickstart.yaml", ["federation.rounds=30"]),
}
FINAL_EVAL = ["eval.every=0"]  # (b) compares the last round only
RANKS = {
    "flexlora 4/8/16 by tier": ("flexlora_quickstart.yaml", FINAL_EVAL),
    "flexlora 4/8/16, mean of changes": ("flexlora_quickstart.yaml", ["adapter.flexlora_mean=changes", *FINAL_EVAL]),
    "flexlora r=8 (uniform)": ("flexlora_quickstart.yaml", ["adapter.r=8", "adapter.rank_by_tier=[8]", *FINAL_EVAL]),
    "lora r=8 (uniform)": ("quickstart.yaml", ["adapter.r=8", DEVICES, *FINAL_EVAL]),
}
SLOW = ["data.partitioner={name: intertwined, slow_categories: [creative_writing, brainstorming], slow_fraction: 0.3}",
        "federation.devices={profile: lognormal, sigma: 0.5, slow_fraction: 0.3, slow_factor: 10.0}"]
SLOW_ROUNDS = ["federation.rounds=10"]  # shorter: (c) is about the ordering, not the final loss
CHURN = ["federation.devices={profile: lognormal, sigma: 1.0, tokens_per_second: 1000, online_fraction: 0.7, "
         "mean_online_s: 60, downlink_bytes_per_s: 500000, uplink_bytes_per_s: 100000}"]
CHURNED = {
    "sync": ("quickstart.yaml", CHURN),
    "buffered K=3": ("buffered_churn_quickstart.yaml", ["federation.rounds=30"]),
}
INTERTWINED = {
    "sync fedavg": ("quickstart.yaml", [*SLOW, *SLOW_ROUNDS]),
    "async fedasync": ("async_quickstart.yaml", [*SLOW, *SLOW_ROUNDS]),
    "buffered fedbuff": ("buffered_quickstart.yaml", [*SLOW, *SLOW_ROUNDS]),
}


def run(name: str, recipe: str, overrides: list[str], scratch: Path) -> list[dict]:
    out = scratch / name.replace(" ", "_").replace("/", "-").replace(",", "")
    if (out / "final").exists():  # --reuse: a finished run of an earlier call
        return read_rows(out)
    shutil.rmtree(out, ignore_errors=True)  # an unfinished run of an earlier call starts again
    cmd = [sys.executable, "-m", "fedllm", "run", str(RECIPES / recipe), f"output.dir={out.parent}",
           f"output.name={out.name}", *EVERY_ROUND, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    (out / "stderr.log").write_text(done.stderr)
    return read_rows(out)


def read_rows(out: Path) -> list[dict]:
    """The run's metrics rows; FlexLoRA's energy log lines (fedllm.adapters.hetero_lora) go
    into the rows of their rounds as `energy_kept` and `svd_dropped`."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    log = out / "stderr.log"
    for match in re.finditer(r"flexlora round (\d+): truncated starts kept ([\d.]+).*?SVD dropped ([\d.]+)",
                             log.read_text() if log.exists() else ""):
        t, kept, dropped = int(match[1]), float(match[2]), float(match[3])
        if t <= len(rows):
            rows[t - 1].update(energy_kept=kept, svd_dropped=dropped)
    if (out / "final" / "adapter_model.safetensors").exists() and rows:
        rows[-1]["top4_energy"] = top_energy(out / "final" / "adapter_model.safetensors", 4)
    return rows


def top_energy(path: Path, k: int) -> float:
    """The share of the final global ΔW's energy (Σ σ²) in each module's top k singular values."""
    import torch
    from safetensors.torch import load_file

    tensors, top, total = load_file(str(path)), 0.0, 0.0
    for key, a in tensors.items():
        if "lora_A" in key:
            s = torch.linalg.svdvals(tensors[key.replace("lora_A", "lora_B")].double() @ a.double()).square()
            top, total = top + float(s[:k].sum()), total + float(s.sum())
    return top / total if total else 1.0


def run_all(parts: dict[str, dict], scratch: Path, workers: int) -> dict[str, dict[str, list[dict]]]:
    """Every run of every part in one pool: {part: {name: metrics rows}}."""
    with ThreadPoolExecutor(workers) as pool:
        futures = {part: {name: pool.submit(run, name, recipe, extra, scratch / part) for name, (recipe, extra) in runs.items()}
                   for part, runs in parts.items()}
        return {part: {name: f.result() for name, f in runs.items()} for part, runs in futures.items()}


def time_to(rows: list[dict], target: float) -> float | None:
    """Simulated time of the first logged round whose eval loss is ≤ target."""
    return next((r["sim_time"] for r in rows if r.get("eval_loss") is not None and r["eval_loss"] <= target), None)


def timed_table(results: dict[str, list[dict]], reference: str = "sync") -> list[str]:
    target, sync_time = results[reference][-1]["eval_loss"], results[reference][-1]["sim_time"]
    lines = [f"target: {reference}'s final eval loss {target:.4f} at simulated {sync_time:.1f} s",
             "| run | rounds | final eval loss | simulated time | reaches target at | × sync time | mean staleness |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, rows in results.items():
        reached = time_to(rows, target)
        stale = sum(r.get("staleness_mean", 0.0) for r in rows) / len(rows)
        ratio = f"{reached / sync_time:.2f}" if reached is not None else "not reached"
        at = f"{reached:.1f} s" if reached is not None else "—"
        lines.append(f"| {name} | {len(rows)} | {rows[-1]['eval_loss']:.4f} | {rows[-1]['sim_time']:.1f} s | {at} | {ratio} | {stale:.2f} |")
    return lines



def print_timed(title: str, results: dict[str, list[dict]], reference: str = "sync") -> None:
    """A part's table against `reference`, then each run's eval-loss curve."""
    print(f"\n{title}")
    print("\n".join(timed_table(results, reference)))
    for name, rows in results.items():
        print(f"  {name}: {curve(rows)}")

def curve(rows: list[dict]) -> str:
    return " ".join(f"{r['sim_time']:.0f}s:{r['eval_loss']:.3f}" for r in rows if r.get("eval_loss") is not None)


def shorter(overrides: list[str], rounds: int | None) -> list[str]:
    """--rounds: every run that many rounds; runs that set twice the rounds (FedBuff) keep that ratio."""
    if rounds is None:
        return []
    doubled = any(o == "federation.rounds=30" for o in overrides)
    return [f"federation.rounds={2 * rounds if doubled else rounds}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="abcd", help="which parts: any of a, b, c, d")
    parser.add_argument("--rounds", type=int, help="every run this many rounds (quicker; FedBuff runs twice as many)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", help="also write every run's metrics rows as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the run directories")
    parser.add_argument("--reuse", help="a run directory root of an earlier --keep call: finished runs are not rerun")
    args = parser.parse_args()
    scratch = Path(args.reuse) if args.reuse else Path(tempfile.mkdtemp(prefix="fedllm-async-"))
    parts = (("a", TIMED), ("b", RANKS), ("c", INTERTWINED), ("d", CHURNED))
    wanted = {part: {name: (recipe, [*extra, *shorter(extra, args.rounds)]) for name, (recipe, extra) in runs.items()}
              for part, runs in parts if part in args.only}
    everything, verdict = run_all(wanted, scratch, args.workers), 0
    if "a" in args.only:
        results = everything["a"]
        print_timed("(a) eval loss vs simulated time, quickstart, lognormal(σ=1) devices", results)
        reached = time_to(results["buffered"], results["sync"][-1]["eval_loss"])
        ok = reached is not None and reached <= 0.6 * results["sync"][-1]["sim_time"]
        verdict |= not ok
        print(f"goal (buffered ≤ 0.6× sync's simulated time to sync's final eval loss): {'PASS' if ok else 'FAIL'}")
    if "b" in args.only:
        results = everything["b"]
        print("\n(b) mixed-rank FlexLoRA vs uniform-rank LoRA, same rounds and clients")
        print("| run | uplink bytes | downlink bytes | final eval loss | global energy kept per round | dropped by the SVD "
              "| final global's energy in its top 4 |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, rows in results.items():
            kept = [r["energy_kept"] for r in rows[1:] if "energy_kept" in r]  # round 1 starts from B = 0
            dropped = [r["svd_dropped"] for r in rows[1:] if "svd_dropped" in r]
            mean = lambda xs: f"{sum(xs) / len(xs):.3f}" if xs else "—"  # noqa: E731
            print(f"| {name} | {sum(r['bytes_up'] for r in rows):,} | {sum(r['bytes_down'] for r in rows):,} | "
                  f"{rows[-1]['eval_loss']:.4f} | {mean(kept)} | {mean(dropped)} | {rows[-1].get('top4_energy', 0):.3f} |")
    if "c" in args.only:
        print_timed("(c) Wang & Gao's intertwined setting: 30% of devices 10× slower hold creative_writing + brainstorming",
                    everything["c"], "sync fedavg")
    if "d" in args.only:
        print_timed("(d) devices online 70% of the time, links 4 / 0.8 Mbit/s down / up", everything["d"])
    if args.out:
        Path(args.out).write_text(json.dumps(everything, indent=1))
    if args.keep or args.reuse:
        print(f"run directories: {scratch}")
    else:
        shutil.rmtree(scratch, ignore_errors=True)
    return verdict


if __name__ == "__main__":
    sys.exit(main())

"""A 2-party federation deployed on Flower on localhost (TLS + SuperNode authentication)
against the simulation of the same recipe, one run each (CPU, several minutes):

- per-round wall time: each round's `seconds` in metrics.jsonl (the server's round: send,
  every party's local training, receive, aggregate), deployed / simulated;
- peak memory: the largest sum of RSS over every process of a side (sampled from /proc
  every 0.5 s: server + SuperLink + Flower helpers + both parties' workers and SuperNodes,
  vs the one simulation process), and the largest single party process;
- base-model loads per party over the run (party.json; goal 1).

    python bench/deployment.py [--rounds 3] [--out FILE]     (needs pip install 'fedllm[flower]')
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from fedllm.deploy.processes import descendants
from fedllm.deploy.localhost import LocalFederation
from fedllm.metrics import read_jsonl

QUICKSTART = str(Path(__file__).parents[1] / "recipes" / "quickstart.yaml")
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


class PeakMemory:
    """Samples the RSS of some process trees: the peak of their sum, and each root tree's peak."""

    def __init__(self, roots):
        self.roots, self.peak_total, self.peak_each, self.done = roots, 0, {}, threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self):
        while not self.done.wait(0.5):
            total = 0
            for name, pid in list(self.roots().items()):
                tree = sum(rss(p) for p in [pid, *descendants(pid)])
                self.peak_each[name] = max(self.peak_each.get(name, 0), tree)
                total += tree
            self.peak_total = max(self.peak_total, total)

    def stop(self):
        self.done.set()
        self.thread.join()


def options(root: Path, name: str, rounds: int) -> list[str]:
    return [f"federation.rounds={rounds}", "federation.num_clients=2", "federation.clients_per_round=2",
            "client.max_steps=10", "eval.max_batches=2", f"output.dir={root / 'runs'}", f"output.name={name}",
            "output.progress=false"]


def deployed(root: Path, rounds: int) -> dict:
    fed = LocalFederation(QUICKSTART, options(root, "deployed", rounds), root)
    start = time.perf_counter()
    fed.start()
    memory = PeakMemory(lambda: {"server": fed.server.pid, **{f"party_{i}": p.pid for i, p in fed.party.items()}})
    try:
        code = fed.wait(3600)
    finally:
        memory.stop()
        fed.stop()
    if code != 0:
        raise SystemExit(f"the deployed run failed: see {root}/serve.log")
    return {"wall_s": time.perf_counter() - start, "rounds": read_jsonl(root / "runs" / "deployed" / "metrics.jsonl"),
            "peak_total": memory.peak_total, "peak_each": memory.peak_each,
            "loads": [json.loads((fed.state_dir(i) / "party.json").read_text())["base_model_loads"] for i in (0, 1)]}


def simulated(root: Path, rounds: int) -> dict:
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "fedllm", "run", QUICKSTART, *options(root, "simulated", rounds)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    memory = PeakMemory(lambda: {"simulation": process.pid})
    code = process.wait()
    memory.stop()
    if code != 0:
        raise SystemExit("the simulation failed")
    return {"wall_s": time.perf_counter() - start, "rounds": read_jsonl(root / "runs" / "simulated" / "metrics.jsonl"),
            "peak_total": memory.peak_total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", help="also write the raw numbers as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dep = deployed(Path(tmp) / "deployed", args.rounds)
        sim = simulated(Path(tmp) / "simulated", args.rounds)
    mb = 2**20
    print(f"{'round':>5} {'deployed s':>11} {'simulated s':>12} {'ratio':>6}")
    for d, s in zip(dep["rounds"], sim["rounds"]):
        print(f"{d['round']:>5} {d['seconds']:>11.1f} {s['seconds']:>12.1f} {d['seconds'] / s['seconds']:>6.2f}")
    mean = lambda rows: sum(r["seconds"] for r in rows) / len(rows)  # noqa: E731
    print(f"mean round: deployed {mean(dep['rounds']):.1f} s / simulated {mean(sim['rounds']):.1f} s = "
          f"{mean(dep['rounds']) / mean(sim['rounds']):.2f}")
    print(f"whole run incl. start-up: deployed {dep['wall_s']:.0f} s / simulated {sim['wall_s']:.0f} s = "
          f"{dep['wall_s'] / sim['wall_s']:.2f}")
    print(f"peak RSS, all processes: deployed {dep['peak_total'] / mb:.0f} MiB / simulated {sim['peak_total'] / mb:.0f} MiB"
          f" = {dep['peak_total'] / sim['peak_total']:.2f}")
    print("peak RSS per process tree: " + ", ".join(f"{k} {v / mb:.0f} MiB" for k, v in dep["peak_each"].items()))
    print(f"base-model loads per party over {args.rounds} rounds: {dep['loads']} (goal: 1 each)")
    if args.out:
        Path(args.out).write_text(json.dumps({"deployed": dep, "simulated": sim}, indent=1))


if __name__ == "__main__":
    main()

"""Uplink bytes and final eval loss of one recipe under each codec chain, side by side.

    python scripts/compression_table.py recipes/fedzip.yaml [key=value overrides...]

Runs the recipe once per variant (codecs replaced, everything else equal: same seed, data,
clients and local training) and prints a markdown table of the total uplink bytes over the
run, the ratio to the uncompressed run, and the last eval loss with its gap to it."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from fedllm.engine import run_recipe

VARIANTS = {
    "none": "[]",
    "fp16": "[{name: fp16}]",
    "qsgd (s=7)": "[{name: qsgd, levels: 7}]",
    "topk 5% + EF": "[{name: topk, fraction: 0.05}]",
    "fedzip (20%, k=3)": "[{name: fedzip}]",
    "fedzip + EF": "[{name: fedzip, error_feedback: true}]",
}


def run_variant(recipe: str, name: str, codecs: str, overrides: list[str], out: Path) -> dict:
    start = time.time()
    slug = "".join(c if c.isalnum() else "_" for c in name)
    run_dir = run_recipe(recipe, [*overrides, f"codecs={codecs}", f"output.dir={out}", f"output.name={slug}", "output.progress=false"])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in rows if r.get("eval_loss") is not None]
    return {"name": name, "bytes_up": sum(r["bytes_up"] for r in rows), "eval_loss": evals[-1], "seconds": time.time() - start}


def main(argv: list[str]) -> None:
    recipe, overrides = argv[0], argv[1:]
    out = Path("runs") / "compression_table"
    results = []
    for name, codecs in VARIANTS.items():
        results.append(run_variant(recipe, name, codecs, overrides, out))
        print(json.dumps(results[-1]), flush=True)
    base = results[0]
    print("\n| codec | uplink bytes | vs none | eval loss | vs none |\n|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['name']} | {r['bytes_up']:,} | {base['bytes_up'] / r['bytes_up']:.1f}× | {r['eval_loss']:.4f} | "
              f"{100 * (r['eval_loss'] / base['eval_loss'] - 1):+.1f}% |")


if __name__ == "__main__":
    main(sys.argv[1:])

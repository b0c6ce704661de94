"""Uplink bytes and final eval loss of one recipe under each codec chain, side by side.

    OMP_NUM_THREADS=1 python scripts/compression_table.py recipes/fedzip.yaml \
        [--out DIR] [--only NAME,...] [--ablation] [--reuse] [key=value overrides...]

Runs the recipe once per variant (codecs replaced, everything else equal: same seed, data,
clients, rounds and local training) and prints a markdown table of the total uplink bytes
over the run, the ratio to the uncompressed run, and the last eval loss with its gap to it.
"fedzip (recipe)" is the recipe's own `codecs:` list, unchanged. `--ablation` adds the
runs that split FedZip's loss gap between sparsification (keep) and k-means quantization,
each with and without error feedback. `--reuse` takes a variant from an earlier finished
run in DIR when that run's recipe is exactly the one this invocation would run (so the
table can be rebuilt after adding variants without rerunning the others). The measured
table and its command are in bench/README.md (§ Compression)."""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from fedllm.engine import run_recipe
from fedllm.recipe import dump_recipe, load_recipe

RECIPE = None  # marks the variant that keeps the recipe's own codecs
VARIANTS = {
    "none": "[]",
    "fp16": "[{name: fp16}]",
    "qsgd (s=7)": "[{name: qsgd, levels: 7}]",
    "topk 5% + EF": "[{name: topk, fraction: 0.05}]",
    "fedzip paper (keep 0.2 k=3)": "[{name: fedzip, keep: 0.2, clusters: 3, error_feedback: false}]",
    "fedzip (recipe)": RECIPE,
}
ABLATION = {
    "fedzip keep 0.2 + EF": "[{name: fedzip, keep: 0.2, clusters: 3, error_feedback: true}]",
    "fedzip keep 1.0 (k-means only)": "[{name: fedzip, keep: 1.0, clusters: 3, error_feedback: false}]",
    "fedzip keep 1.0 + EF": "[{name: fedzip, keep: 1.0, clusters: 3, error_feedback: true}]",
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def finished(run_dir: Path, recipe: str, overrides: list[str]) -> bool:
    """The run dir holds a completed run (its final export) of exactly this recipe."""
    if not (run_dir / "final").exists() or not (run_dir / "recipe.yaml").exists():
        return False
    return (run_dir / "recipe.yaml").read_text() == dump_recipe(load_recipe(recipe, overrides))


def run_variant(recipe: str, name: str, codecs: str | None, overrides: list[str], out: Path, reuse: bool) -> dict:
    start = time.time()
    run_dir = out / slug(name)
    overrides = [*overrides, *([f"codecs={codecs}"] if codecs is not None else []),
                 f"output.dir={out}", f"output.name={slug(name)}", "output.progress=false"]
    reused = reuse and finished(run_dir, recipe, overrides)
    if not reused:
        shutil.rmtree(run_dir, ignore_errors=True)  # a stale or partial run would append to its metrics
        run_dir = run_recipe(recipe, overrides)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in rows if r.get("eval_loss") is not None]
    return {"name": name, "codecs": codecs if codecs is not None else "(recipe)", "rounds": len(rows),
            "bytes_up": sum(r["bytes_up"] for r in rows), "eval_loss": evals[-1],
            "seconds": round(time.time() - start, 1), "reused": reused, "run_dir": str(run_dir)}


def table(results: list[dict]) -> str:
    base = next(r for r in results if r["name"] == "none")
    lines = ["| codec | rounds | uplink bytes | vs none | eval loss | vs none |", "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['name']} | {r['rounds']} | {r['bytes_up']:,} | {base['bytes_up'] / r['bytes_up']:.1f}× | "
                     f"{r['eval_loss']:.4f} | {100 * (r['eval_loss'] / base['eval_loss'] - 1):+.1f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="dotted key=value recipe overrides, applied to every variant")
    parser.add_argument("--out", default="runs/compression_table", help="where the runs go (one folder per variant)")
    parser.add_argument("--only", help="comma-separated variant names to run ('none' is always run)")
    parser.add_argument("--ablation", action="store_true", help="add the keep / error-feedback ablation of FedZip")
    parser.add_argument("--reuse", action="store_true", help="reuse finished runs of the identical recipe in --out")
    args = parser.parse_args()
    variants = {**VARIANTS, **(ABLATION if args.ablation else {})}
    if args.only:
        wanted = {"none", *(n.strip() for n in args.only.split(","))}
        unknown = wanted - set(variants)
        if unknown:
            parser.error(f"unknown variants {sorted(unknown)}; known: {sorted(variants)}")
        variants = {n: c for n, c in variants.items() if n in wanted}
    results = []
    for name, codecs in variants.items():
        results.append(run_variant(args.recipe, name, codecs, args.overrides, Path(args.out), args.reuse))
        print(json.dumps(results[-1]), flush=True)
    print("\n" + table(results))


if __name__ == "__main__":
    main()

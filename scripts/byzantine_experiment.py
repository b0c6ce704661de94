"""Clean vs attacked eval loss for FedAvg, the coordinate-wise median and NNM + trimmed mean,
on recipes/byzantine_quickstart.yaml (20% sign-flipping clients). CPU, a few minutes:

    OMP_NUM_THREADS=1 python scripts/byzantine_experiment.py [RECIPE] [key=value ...]

Each row runs the recipe twice — without its `byzantine:` section and with it — changing
only `strategy:`. The robust rules take f from the attack's count."""
from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

import yaml

from fedllm.engine import Federation
from fedllm.recipe import apply_overrides, recipe_from_dict

RULES = {
    "fedavg": lambda f: {"name": "fedavg"},
    "median": lambda f: {"name": "median", "f": f},
    "nnm+trimmed_mean": lambda f: {"name": "trimmed_mean", "f": f, "nnm": True},
}


def final_eval_loss(raw: dict, out: Path) -> float:
    recipe = recipe_from_dict(raw)
    fed = Federation(recipe, out)
    fed.start()
    return fed.run()[-1]["eval_loss"]


def main(argv: list[str]) -> None:
    path = argv[0] if argv and "=" not in argv[0] else "recipes/byzantine_quickstart.yaml"
    overrides = [a for a in argv if "=" in a]
    base = apply_overrides(yaml.safe_load(Path(path).read_text()), overrides)
    f = base["byzantine"]["count"]
    logging.getLogger("fedllm").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for name, strategy in RULES.items():
            for attacked in (False, True):
                raw = {**base, "strategy": strategy(f), "byzantine": base["byzantine"] if attacked else None}
                raw["output"] = {**raw.get("output", {}), "dir": tmp, "name": f"{name}-{attacked}", "progress": False}
                results[name, attacked] = final_eval_loss(raw, Path(tmp) / f"{name}-{attacked}")
                print(f"  {name:18s} {'attacked' if attacked else 'clean':8s} eval_loss {results[name, attacked]:.4f}", flush=True)
    reference = results["fedavg", False]
    attack = ", ".join(f"{k}={v}" for k, v in base["byzantine"].items())
    print(f"\n{path} — attack: {attack}; eval loss after {base['federation']['rounds']} rounds\n")
    print("| strategy | clean | attacked | attacked vs clean FedAvg |")
    print("|---|---|---|---|")
    for name in RULES:
        clean, hit = results[name, False], results[name, True]
        print(f"| {name} | {clean:.4f} | {hit:.4f} | {100 * (hit / reference - 1):+.1f}% |")


if __name__ == "__main__":
    main(sys.argv[1:])

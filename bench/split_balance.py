"""How evenly a round's clients split over 2 ranks, in padded tokens (what a local round
costs), on the side-by-side workload of bench/lean.py (20 clients, 10 per round, 5 steps of
batch 4): the round-robin split fedllm used before against the split by planned tokens
(fedllm/balance.py). Prints, over the rounds, the busier rank's tokens / the mean of the two
(1.0 = even; the round waits for the busier rank).

    python bench/split_balance.py [--rounds 20] [--ranks 2]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lean import recipe  # noqa: E402  (the same workload)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args()
    from fedllm.balance import split_by_cost
    from fedllm.engine import Federation
    from fedllm.recipe import Recipe

    with tempfile.TemporaryDirectory(prefix="fedllm-split-") as tmp:
        run_dir = Path(tmp) / "run"
        run_dir.mkdir()
        fed = Federation(Recipe.model_validate(recipe(Path(tmp), "split", args.rounds)), run_dir)
        uneven = {"round robin": [], "by planned tokens": []}
        for t in range(args.rounds):
            sampled = fed.participation.sampled(t)
            cost = {c: fed.client.planned_tokens(c, t) for c in sampled}
            splits = {"round robin": [sampled[r :: args.ranks] for r in range(args.ranks)],
                      "by planned tokens": split_by_cost(sampled, [cost[c] for c in sampled], args.ranks)}
            for name, parts in splits.items():
                loads = [sum(cost[c] for c in part) for part in parts]
                uneven[name].append(max(loads) * args.ranks / sum(loads))
    print(f"busier rank's padded tokens / the mean, {args.rounds} rounds on {args.ranks} ranks:")
    for name, values in uneven.items():
        print(f"  {name:<18} mean {sum(values) / len(values):.4f}  worst {max(values):.4f}")


if __name__ == "__main__":
    main()

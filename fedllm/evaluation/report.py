"""The compact table `fedllm eval` prints from its results.json."""
from __future__ import annotations

METRICS = ("eval_loss", "perplexity", "token_accuracy")
SPREAD = ("mean", "worst", "p10", "std")


def _num(value) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def _rows(label: str, cells: list) -> str:
    return f"  {label:<36}" + "".join(f"{_num(c):>12}" for c in cells)


def _spread_rows(title: str, reports: list[dict | None]) -> list[str]:
    lines = []
    for metric in ("eval_loss", "token_accuracy"):
        for key in SPREAD:
            cells = [(r or {}).get("spread", {}).get(metric, {}).get(key) for r in reports]
            lines.append(_rows(f"{title} {metric} {key}", cells))
    return lines


def table(results: dict) -> str:
    """One block per scored dataset: target (and base) metrics, the run's own logged numbers,
    per-client spread, personalised spread; then tasks and generations."""
    target = results["target"]
    lines = [f"fedllm eval: {target} of {results['path']}"]
    for name, score in results.get("scores", {}).items():
        base = score.get("base")
        columns = [target] + (["base"] if base else [])
        lines.append(f"{name} ({score['examples']} examples)")
        lines.append(f"  {'':<36}" + "".join(f"{c:>12}" for c in columns))
        for metric in METRICS:
            lines.append(_rows(metric, [score["metrics"].get(metric)] + ([base["metrics"].get(metric)] if base else [])))
        logged = score.get("run_logged")
        if logged:
            same = abs(logged["eval_loss"] - score["metrics"]["eval_loss"]) <= 1e-6
            lines.append(_rows(f"run's logged eval_loss ({'same' if same else 'DIFFERS'})", [logged["eval_loss"]]))
        if name == "heldout" and not score.get("per_client"):
            lines.append("  (no per-client numbers: this run held out one pooled set; eval.per_client=true splits it per client)")
        if score.get("per_client"):
            count = sum("eval_loss" in c for c in score["per_client"]["clients"])
            lines.append(f"  per client ({count} clients, each on its own held-out slice; p10: 10% from the worst end)")
            lines += _spread_rows("client", [score["per_client"], (base or {}).get("per_client")] if base else [score["per_client"]])
        if score.get("personalized"):
            p = score["personalized"]
            lines.append(f"  personalised: each client after {p['steps']} local steps on its own shard (lr {p['learning_rate']:g})")
            lines += _spread_rows("personalised", [p])
    for name, task in results.get("tasks", {}).items():
        lines.append(f"task {name}")
        for key, value in task.get("metrics", {}).items():
            lines.append(_rows(key, [value]))
    if results.get("generations"):
        g = results["generations"]
        lines.append(f"generations: {g['count']} ({'sampled, seed ' + str(g['seed']) if g.get('sampled') else 'greedy'}) "
                     f"in {g['file']}")
    return "\n".join(lines)

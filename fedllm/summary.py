"""The end-of-run summary a command prints: rounds, the first and last evaluation, the bytes
on the wire, the time, where the adapter is and how to export and plot it."""
from __future__ import annotations

from pathlib import Path

import yaml

from fedllm.metrics import human_bytes, read_jsonl


def duration(seconds: float) -> str:
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes}m{s:02d}s" if minutes else f"{seconds:.1f}s"


def planned_rounds(run_dir: Path) -> int | None:
    try:
        return int(yaml.safe_load((run_dir / "recipe.yaml").read_text())["federation"]["rounds"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return None


def change(rows: list[dict], key: str) -> str | None:
    """'<first> (round a) -> <last> (round b)' over the rounds that have `key`."""
    seen = [r for r in rows if r.get(key) is not None]
    if not seen:
        return None
    first, last, name = seen[0], seen[-1], key.replace("_", " ")
    if first is last:
        return f"{name} {last[key]:.4f} (round {last['round']})"
    return f"{name} {first[key]:.4f} (round {first['round']}) -> {last[key]:.4f} (round {last['round']})"


def run_summary(run_dir: str | Path, seconds: float) -> str:
    run_dir = Path(run_dir)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    done, planned = (rows[-1]["round"] if rows else 0), planned_rounds(run_dir)
    stopped = f" of {planned} planned (stopped early: see the warning above)" if planned and done < planned else ""
    lines = [f"done: {done} round{'' if done == 1 else 's'}{stopped} in {duration(seconds)} (this command); run directory {run_dir}"]
    metrics = [c for c in (change(rows, k) for k in ("eval_loss", "token_accuracy", "train_loss")) if c]
    if metrics:
        lines.append("  " + "; ".join(metrics))
    up, down = (sum(r.get(k, 0) for r in rows) for k in ("bytes_up", "bytes_down"))
    lines.append(f"  bytes on the wire: {human_bytes(up)} up, {human_bytes(down)} down (all clients, all rounds)")
    final = run_dir / "final"
    if final.is_dir():
        kind = "a PEFT adapter" if (final / "adapter_config.json").exists() else "the merged model"
        other = f"; another round or format: fedllm export {run_dir} OUT --round N --to peft|merged" \
            if any((run_dir / "checkpoints").glob("round_*")) else " (no checkpoints: output.checkpoints was false)"
        lines.append(f"  final: {final} ({kind}){other}")
    lines.append(f"  curves: fedllm plot {run_dir} (writes {run_dir / 'plots'}/loss.png, eval.png, bytes.png)")
    return "\n".join(lines)

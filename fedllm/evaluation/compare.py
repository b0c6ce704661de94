"""Runs side by side: one figure overlaying their eval loss against rounds and against
cumulative uplink bytes (each labelled by adapter / strategy / codecs), the per-client
spread of one run (a box per eval round), and a compact table of their numbers."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from fedllm.metrics import plot_run, read_jsonl


def _matplotlib():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def describe(run_dir: Path) -> dict:
    """What a run is (from its recipe.yaml) and its logged rows."""
    run_dir = Path(run_dir)
    if not (run_dir / "recipe.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a fedllm run directory (no recipe.yaml)")
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text()) or {}
    codecs = "+".join(c.get("name", "?") for c in recipe.get("codecs") or []) or "no codec"
    what = f"{recipe.get('adapter', {}).get('name', '?')}/{recipe.get('strategy', {}).get('name', '?')}/{codecs}"
    return {"name": run_dir.name, "label": f"{run_dir.name} ({what})", "what": what, "rows": read_jsonl(run_dir / "metrics.jsonl")}


def overlay_figure(run_dirs: list):
    """The figure: eval loss against rounds (left), cumulative bytes up and, where every run
    has simulated devices (fedllm.asynchrony), simulated time (right)."""
    plt = _matplotlib()
    runs = [describe(d) for d in run_dirs]
    timed = all(any("sim_time" in r for r in run["rows"]) for run in runs)
    fig, axes = plt.subplots(1, 3 if timed else 2, figsize=(16 if timed else 11, 4))
    by_round, by_bytes = axes[0], axes[1]
    for run in runs:
        sent, points = 0, []
        for r in run["rows"]:
            sent += r.get("bytes_up", 0)
            if r.get("eval_loss") is not None:
                points.append((r["round"], sent, r["eval_loss"], r.get("sim_time")))
        if not points:
            continue
        rounds, sent_bytes, losses, times = zip(*points)
        by_round.plot(rounds, losses, marker="o", markersize=3, label=run["label"])
        by_bytes.plot([b / 2**20 for b in sent_bytes], losses, marker="o", markersize=3, label=run["label"])
        if timed:
            axes[2].plot(times, losses, marker="o", markersize=3, label=run["label"])
    by_round.set_xlabel("round")
    by_bytes.set_xlabel("cumulative bytes up (MiB)")
    if timed:
        axes[2].set_xlabel("simulated time (s)")
    for ax in axes:
        ax.set_ylabel("eval loss")
        ax.grid(alpha=0.3)
    by_round.legend(fontsize=8)
    fig.tight_layout()
    return fig


def client_spread_figure(run_dir):
    """A box of the clients' eval losses per eval round (runs with eval.per_client), or None."""
    rows = [r for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if r.get("eval_clients")]
    if not rows:
        return None
    plt = _matplotlib()
    fig, ax = plt.subplots(figsize=(6, 4))
    losses = [[c["eval_loss"] for c in r["eval_clients"] if "eval_loss" in c] for r in rows]
    ax.boxplot(losses, positions=list(range(len(rows))))
    ax.set_xticks(range(len(rows)), [str(r["round"]) for r in rows])
    ax.plot(range(len(rows)), [r["eval_loss"] for r in rows], "x--", label="pooled")
    ax.set_xlabel("round")
    ax.set_ylabel("eval loss per client")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot(run_dirs: list, out: str | None = None) -> list[Path]:
    """One run: its curves (fedllm.metrics.plot_run) and its per-client spread; several: the overlay."""
    plt = _matplotlib()
    if len(run_dirs) == 1:
        written = plot_run(run_dirs[0])
        fig = client_spread_figure(run_dirs[0])
        if fig is not None:
            written.append(Path(run_dirs[0]) / "plots" / "clients.png")
            fig.savefig(written[-1], dpi=100)
            plt.close(fig)
        return written
    path = Path(out) if out else Path(run_dirs[0]).parent / "compare.png"
    fig = overlay_figure(run_dirs)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def _eval_results(run_dir: Path) -> dict:
    """The newest `fedllm eval` results of a run's last evaluated round, if any."""
    found = sorted(Path(run_dir).glob("eval/round_*/results.json"), key=lambda p: int(p.parent.name.split("_")[1]))
    return json.loads(found[-1].read_text()) if found else {}


def compare_table(run_dirs: list) -> str:
    """Per run: what it is, rounds, final logged eval loss / accuracy, bytes up, and the
    held-out per-client spread of its newest `fedllm eval` (if any)."""
    columns = [("run", 28), ("adapter/strategy/codec", 26), ("rounds", 7), ("eval_loss", 10), ("tok_acc", 8),
               ("MiB up", 9), ("clients mean", 13), ("worst", 8), ("p10", 8)]
    lines = ["".join(f"{name:<{width}}" for name, width in columns)]
    for run_dir in run_dirs:
        run = describe(run_dir)
        rows = run["rows"]
        last = next((r for r in reversed(rows) if r.get("eval_loss") is not None), {})
        spread = _eval_results(run_dir).get("scores", {}).get("heldout", {}).get("per_client", {}).get("spread", {})
        loss = spread.get("eval_loss", {})
        cells = [run["name"], run["what"], len(rows), last.get("eval_loss"), last.get("token_accuracy"),
                 sum(r.get("bytes_up", 0) for r in rows) / 2**20, loss.get("mean"), loss.get("worst"), loss.get("p10")]
        lines.append("".join(f"{_cell(c):<{w}}" for c, (_, w) in zip(cells, columns)))
    return "\n".join(lines)


def _cell(value) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)

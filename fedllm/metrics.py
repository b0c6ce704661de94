"""Run outputs: metrics.jsonl (one line per round), ledger.jsonl (bytes up/down per client
per round), optional trackers through accelerate, and PNG plots."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from fedllm.rundir import open_no_follow, refuse_planted_links

log = logging.getLogger("fedllm")


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines log; a last line cut by a kill mid-write is dropped with a warning."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise ValueError(f"{path}: line {number} is not JSON (only a cut last line is expected)") from None
            log.warning("%s: dropping a half-written last line (the run was killed while logging)", path)
    return rows


def write_atomically(path: Path, text: str) -> None:
    """Writes a temp file beside `path`, then renames it over: a kill leaves the old or the new file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open_no_follow(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_writable(directory: Path) -> None:
    """Fails at once, in one line, where runs cannot be written (before any model is loaded)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".fedllm-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise OSError(f"output.dir={directory} cannot be written ({err.strerror or err}): set output.dir to a "
                          "directory you can write") from None


def show_progress(enabled: bool) -> bool:
    """Progress bars only on a terminal: in a log file each refresh would be a line of its own."""
    return enabled and sys.stderr.isatty()


def truncate_jsonl(path: Path, rounds_done: int) -> None:
    """On resume: forget lines of rounds after the checkpoint of round `rounds_done` (they are re-run)."""
    if path.exists():
        kept = [r for r in read_jsonl(path) if r["round"] <= rounds_done]
        write_atomically(path, "".join(json.dumps(r) + "\n" for r in kept))


# why an upload was left out of its round (erased: a simulated lossy link; non_finite_aggregate:
# each upload was fine, their aggregate was not, and the round was refused)
REJECTIONS = ("malformed", "non_finite", "erased", "non_finite_aggregate")


def rejection_code(reason: str | None) -> int:
    """A stat row's `rejected` column: 0 for an accepted upload, else 1 + the reason's index."""
    return 0 if reason is None else 1 + REJECTIONS.index(reason)


def rejections(stats: list[dict]) -> dict:
    """{"rejected": {reason: [client ids]}} where some upload was left out, else nothing."""
    found = {}
    for s in stats:
        if s.get("rejected"):
            found.setdefault(REJECTIONS[s["rejected"] - 1], []).append(int(s["client"]))
    return {"rejected": found} if found else {}


def split_totals(stats: list[dict]) -> dict:
    """The split-learning share of the bytes (already inside bytes_up/down); only where
    some local round exchanged any, so plain runs keep their columns."""
    up, down = (int(sum(s.get(k, 0) for s in stats)) for k in ("split_bytes_up", "split_bytes_down"))
    return {"split_bytes_up": up, "split_bytes_down": down} if up or down else {}


def missing(stats: list[dict]) -> dict:
    """The sampled clients that never answered (a deployed federation's dropouts), where any did not."""
    ids = [s["client"] for s in stats if "missing" in s]
    return {"missing_clients": ids} if ids else {}


class MetricsLog:
    def __init__(self, run_dir: Path, enabled: bool, accelerator=None):
        self.run_dir, self.enabled, self.accelerator = Path(run_dir), enabled, accelerator

    def _append(self, name: str, rows: list[dict]) -> None:
        with open_no_follow(self.run_dir / name, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
            f.flush()

    def log_round(self, round: int, rows: list, extra: dict) -> dict:
        """Round `round`'s metrics row from its clients' rows (fedllm.server.ClientRow) and `extra`."""
        stats = [r.as_dict() for r in rows]
        accepted = [s for s in stats if s["accepted"]]
        trained = [s for s in accepted if s["steps"] > 0]  # e.g. FedAMD's anchors take no step
        weight = sum(s["num_samples"] for s in trained)
        row = {
            "round": round,
            "clients": len(stats),
            "dropped": len(stats) - len(accepted),
            "train_loss": sum(s["train_loss"] * s["num_samples"] for s in trained) / weight if weight else None,
            "bytes_up": int(sum(s["bytes_up"] for s in stats)),
            "bytes_down": int(sum(s["bytes_down"] for s in stats)),
            **split_totals(stats),
            **rejections(stats),
            **missing(stats),
            **extra,
        }
        if self.enabled:
            self._append("ledger.jsonl", [
                {"round": round, "client": s["client"], "bytes_up": int(s["bytes_up"]), "bytes_down": int(s["bytes_down"]),
                 **split_totals([s]), **({"missing": s["missing"]} if "missing" in s else {}),
                 **({"rejected": REJECTIONS[s["rejected"] - 1]} if s.get("rejected") else {})}
                for s in stats
            ])
            self._append("metrics.jsonl", [row])
            if not sys.stderr.isatty():  # no progress bar: one line per round instead
                log.info("%s", round_line(row))
            if self.accelerator is not None and self.accelerator.trackers:
                self.accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=round)
        return row


def round_line(row: dict) -> str:
    shown = [f"{k.replace('_', ' ')} {row[k]:.4f}" for k in ("train_loss", "eval_loss", "token_accuracy")
             if row.get(k) is not None]
    return (f"round {row['round']}: {', '.join(shown)}, {human_bytes(row['bytes_up'])} up, "
            f"{human_bytes(row['bytes_down'])} down, {row.get('seconds', 0):.1f} s")


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def run_title(run_dir: Path) -> str:
    """'<run name>: <adapter> + <strategy> [+ codecs]' from the run's recipe.yaml."""
    import yaml

    try:
        recipe = yaml.safe_load((Path(run_dir) / "recipe.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        recipe = {}
    names = [(recipe.get(k) or {}).get("name") for k in ("adapter", "strategy")]
    names += [c.get("name") for c in recipe.get("codecs") or [] if isinstance(c, dict)]
    return f"{Path(run_dir).resolve().name}: {' + '.join(n for n in names if n)}"


def plot_run(run_dir: Path) -> list[Path]:
    """Writes plots/{loss,eval,bytes}.png from metrics.jsonl, and time.png (losses against simulated time) where logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    refuse_planted_links(Path(run_dir))
    rows = read_jsonl(Path(run_dir) / "metrics.jsonl")
    if not rows:
        raise FileNotFoundError(f"{run_dir}/metrics.jsonl has no rounds to plot")
    out = Path(run_dir) / "plots"
    out.mkdir(exist_ok=True)
    rounds = [r["round"] for r in rows]  # round n: after n rounds, as checkpoints/round_n
    # bytes in the unit of the largest total; up and down drawn apart (line, marker) since they often coincide
    total = max(sum(r["bytes_up"] for r in rows), sum(r["bytes_down"] for r in rows), 1)
    unit, scale = next((u, s) for u, s in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3), ("B", 1)) if total >= s or s == 1)
    figures = {
        "loss": ([("train_loss", "train loss", "-", "o"), ("eval_loss", "eval loss", "--", "s")], "loss (nats per token)"),
        "eval": ([("token_accuracy", "eval token accuracy", "-", "o")], "token accuracy (fraction)"),
        "bytes": ([("cum_bytes_up", "up (clients → server)", "-", "o"), ("cum_bytes_down", "down (server → clients)", "--", "x")],
                  f"cumulative bytes ({unit})"),
    }
    cumulative = {"cum_bytes_up": 0, "cum_bytes_down": 0}
    for r in rows:
        for key in cumulative:
            cumulative[key] += r[key.removeprefix("cum_")]
            r[key] = cumulative[key] / scale
    title = run_title(run_dir)
    written = []
    for name, (series, ylabel) in figures.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, label, style, marker in series:
            points = [(x, r[key]) for x, r in zip(rounds, rows) if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), linestyle=style, marker=marker, markersize=5, label=label)
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=100)
        plt.close(fig)
        written.append(out / f"{name}.png")
    if any("sim_time" in r for r in rows):  # a run with simulated devices (fedllm.asynchrony)
        written.append(plot_against_time(rows, out / "time.png", plt))
    return written


def plot_against_time(rows: list[dict], path: Path, plt) -> Path:
    """Losses against the simulated clock, each logged round a point: the straggler wait of a
    sync run shows as wide gaps."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("train_loss", "train loss"), ("eval_loss", "eval loss")):
        points = [(r["sim_time"], r[key]) for r in rows if r.get(key) is not None and "sim_time" in r]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3, label=label)
    ax.set_xlabel("simulated time (s)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

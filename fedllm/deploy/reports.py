"""What a deployed server takes from a party's numbers instead of holding its data: the
counts it reports before round 0 (its client size), the numbers of each train reply, and
its summed eval loss, each checked for being a number that party could have before it is
used; evals are then pooled token-weighted under the simulation's metric names."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedllm.evaluation.per_client import metrics, per_client_row

MAX_EXAMPLES = 10**9  # a reported count past this is not a count of examples


def count_problem(value, what: str, low: int) -> str | None:
    return number_problem(value, what, low, MAX_EXAMPLES)


def check_sizes(report: dict) -> tuple[int, int] | str:
    """(training examples, held-out examples) from a party's size report, or why it is refused."""
    problem = count_problem(report.get("num_samples"), "training example count", 1) or count_problem(
        report.get("eval_examples", 0), "held-out example count", 0)
    return problem or (report["num_samples"], report.get("eval_examples", 0))


@dataclass(frozen=True)
class TrainLimits:
    """What one party's train reply may say, from what the server knew before the round."""

    num_samples: int  # its training size, reported and checked before round 0
    steps: int  # the most local optimizer steps one round of it may take
    split_bytes_per_step: int  # the most bytes one local step may exchange with the server (split learning)
    uniform_weights: bool  # the strategy weighs every accepted client 1 (Strategy.uniform_weights)


def check_train_report(report: dict, limits: TrainLimits) -> dict | str:
    """A party's train numbers — weight, num_samples, train_loss, steps, split_bytes_up/down —
    each of the right type and in range, or why the reply is refused (naming the field).

    The weight is recomputed, never taken: the one the simulation gives (Client.run: 1 under
    the strategy's uniform_weights, else the client's sample count), from the checked
    num_samples, which is at most the size the party reported before round 0. The reported
    weight must still be a positive number; a larger one changes nothing. A train_loss is
    checked only where the party stepped (a round of 0 steps has none, NaN, as in simulation)."""
    steps = report.get("steps")
    problem = (number_problem(report.get("weight"), "weight", 0, math.inf, whole=False, low_open=True)
               or number_problem(report.get("num_samples"), "num_samples", 1, limits.num_samples)
               or number_problem(steps, "steps", 0, limits.steps))
    if problem:
        return problem
    loss = report.get("train_loss")
    if steps and (problem := number_problem(loss, "train_loss", 0, math.inf, whole=False)):
        return problem
    most = steps * limits.split_bytes_per_step
    split = {key: report.get(key, 0) for key in ("split_bytes_up", "split_bytes_down")}  # 0: a plain loop's
    if problem := next(filter(None, (number_problem(v, k, 0, most) for k, v in split.items())), None):
        return problem
    weight = 1.0 if limits.uniform_weights else float(report["num_samples"])
    return {"weight": weight, "num_samples": report["num_samples"], "train_loss": float(loss) if steps else 0.0,
            "steps": steps, **split}


def number_problem(value, field: str, low, high, whole: bool = True, low_open: bool = False) -> str | None:
    """Why `value` is not a JSON number from `low` to `high` (a whole one unless whole=False), or None."""
    kinds = int if whole else (int, float)
    ok = (not isinstance(value, bool) and isinstance(value, kinds) and (isinstance(value, int) or math.isfinite(value))
          and (low < value if low_open else low <= value) and value <= high)
    if ok:
        return None
    what = "a whole number" if whole else "a finite number"
    span = f"from {low} to {high:,}" if math.isfinite(high) else f"{'>' if low_open else '>='} {low}"
    return f"its {field} {value!r} is not {what} {span}"


def check_eval(report: dict, max_tokens: int) -> tuple[float, int, int] | str:
    """(summed loss, tokens, correct predictions) from a party's eval answer, or why it is refused:
    at most `max_tokens` tokens (its held-out examples × data.max_length), no more correct than tokens."""
    loss, tokens, correct = report.get("loss_sum"), report.get("tokens"), report.get("correct")
    if problem := count_problem(tokens, "token count", 0) or count_problem(correct, "correct count", 0):
        return problem
    if tokens > max_tokens or correct > tokens:
        return f"it reports {tokens} tokens ({correct} correct), more than its held-out examples can have ({max_tokens})"
    if problem := number_problem(loss, "summed loss", 0, math.inf, whole=False):
        return problem
    return float(loss), tokens, correct


def pooled_eval(client_sums: torch.Tensor, per_client: bool) -> dict:
    """The simulation's eval metrics from (clients, 3) sums (loss·tokens, tokens, correct): the
    token-weighted pool, and under eval.per_client every client's numbers and their spread."""
    if per_client:
        return per_client_row(client_sums)
    return {k: v for k, v in metrics(client_sums.sum(0)).items() if k != "tokens"}

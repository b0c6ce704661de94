"""What a deployed server takes from a party's numbers instead of holding its data: the
counts it reports before round 0 (its client size, trusted as its weight already is) and
its summed eval loss, checked for being numbers a party could have, then pooled
token-weighted under the simulation's metric names."""
from __future__ import annotations

import math

import torch

from fedllm.evaluation.per_client import metrics, per_client_row

MAX_EXAMPLES = 10**9  # a reported count past this is not a count of examples


def count_problem(value, what: str, low: int) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= MAX_EXAMPLES:
        return f"its {what} {value!r} is not a whole number from {low} to {MAX_EXAMPLES:,}"
    return None


def check_sizes(report: dict) -> tuple[int, int] | str:
    """(training examples, held-out examples) from a party's size report, or why it is refused."""
    problem = count_problem(report.get("num_samples"), "training example count", 1) or count_problem(
        report.get("eval_examples", 0), "held-out example count", 0)
    return problem or (report["num_samples"], report.get("eval_examples", 0))


def check_eval(report: dict, max_tokens: int) -> tuple[float, int, int] | str:
    """(summed loss, tokens, correct predictions) from a party's eval answer, or why it is refused:
    at most `max_tokens` tokens (its held-out examples × data.max_length), no more correct than tokens."""
    loss, tokens, correct = report.get("loss_sum"), report.get("tokens"), report.get("correct")
    if problem := count_problem(tokens, "token count", 0) or count_problem(correct, "correct count", 0):
        return problem
    if tokens > max_tokens or correct > tokens:
        return f"it reports {tokens} tokens ({correct} correct), more than its held-out examples can have ({max_tokens})"
    if isinstance(loss, bool) or not isinstance(loss, (int, float)) or not 0 <= loss < math.inf:
        return f"its summed loss {loss!r} is not a finite number >= 0"
    return float(loss), tokens, correct


def pooled_eval(client_sums: torch.Tensor, per_client: bool) -> dict:
    """The simulation's eval metrics from (clients, 3) sums (loss·tokens, tokens, correct): the
    token-weighted pool, and under eval.per_client every client's numbers and their spread."""
    if per_client:
        return per_client_row(client_sums)
    return {k: v for k, v in metrics(client_sums.sum(0)).items() if k != "tokens"}

"""Per-example scoring and what per-client evaluation reports: each client's loss, perplexity
and token accuracy on its own held-out slice, and their spread over clients (mean, worst,
10th percentile from the worst end, standard deviation). Token-weighted, the per-client
sums add up to the pooled metric exactly: they are the same per-example sums, grouped."""
from __future__ import annotations

import math

import numpy as np
import torch

from fedllm.adapters.base import Adapter
from fedllm.data import IGNORE_INDEX, collate
from fedllm.distributed import Reducer
from fedllm.state import State

# what a summary says about each metric, and which end is the worse one
SPREAD_METRICS = {"eval_loss": "high", "token_accuracy": "low"}


@torch.no_grad()
def example_sums(model: torch.nn.Module, examples: list[dict], batch_size: int, pad_token_id: int, device,
                 rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """(n, 3) float64 per example: summed response-token NLL, response tokens, correct next-token
    predictions. This rank scores every world_size-th batch; the other rows stay 0 (sum over ranks)."""
    model.eval()
    sums = torch.zeros(len(examples), 3, dtype=torch.float64)
    for start in list(range(0, len(examples), batch_size))[rank::world_size]:
        inputs = {k: v.to(device) for k, v in collate(examples[start : start + batch_size], pad_token_id).items()}
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.float()[:, :-1]
        labels = inputs["labels"][:, 1:]
        mask = labels != IGNORE_INDEX
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none", ignore_index=IGNORE_INDEX)
        correct = (logits.argmax(-1) == labels) & mask
        rows = torch.stack([nll.double().sum(1), mask.sum(1).double(), correct.sum(1).double()], dim=1)
        sums[start : start + len(rows)] = rows.cpu()
    return sums


def metrics(sums) -> dict:
    """eval_loss, perplexity and token_accuracy of summed (loss·tokens, tokens, correct); {} without tokens."""
    loss_sum, tokens, correct = (float(x) for x in sums)
    if tokens == 0:
        return {}
    mean = loss_sum / tokens
    return {"eval_loss": mean, "perplexity": math.exp(min(mean, 700.0)), "token_accuracy": correct / tokens,
            "tokens": int(tokens)}


def spread(values: list[float], worse: str) -> dict:
    """mean, worst, p10 (the client 10% of the way from the worst end), best and std (population)."""
    v = np.asarray(values, dtype=np.float64)
    high = worse == "high"
    return {"mean": float(v.mean()), "worst": float(v.max() if high else v.min()),
            "p10": float(np.percentile(v, 90 if high else 10)), "best": float(v.min() if high else v.max()),
            "std": float(v.std())}


def per_client_report(client_sums: torch.Tensor) -> dict:
    """From (clients, 3) sums: the pooled metrics, every client's, and their spread."""
    clients = [{"client": c, **metrics(row)} for c, row in enumerate(client_sums)]
    scored = [c for c in clients if "eval_loss" in c]
    summary = {name: spread([c[name] for c in scored], worse) for name, worse in SPREAD_METRICS.items()} if scored else {}
    return {"pooled": metrics(client_sums.sum(0)), "clients": clients, "spread": summary}


def client_groups(client_eval: list[list[dict]], cap: int | None) -> tuple[list[dict], list[int]]:
    """Every client's held-out examples (its first `cap` only, if given) in one list, and each one's client."""
    examples, groups = [], []
    for client, mine in enumerate(client_eval):
        mine = mine[:cap] if cap is not None else mine
        examples += mine
        groups += [client] * len(mine)
    return examples, groups


def score_clients(model, client_eval: list[list[dict]], batch_size: int, pad_token_id: int, reducer: Reducer,
                  cap: int | None = None, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """(clients, 3) sums of the model as it is, each client on its own held-out slice, summed over ranks."""
    examples, groups = client_groups(client_eval, cap)
    sums = example_sums(model, examples, batch_size, pad_token_id, reducer.device, rank, world_size)
    out = torch.zeros(len(client_eval), 3, dtype=torch.float64).index_add_(0, torch.tensor(groups, dtype=torch.long), sums)
    return reducer.sum_(out)


def evaluate_per_client(model: torch.nn.Module, adapter: Adapter, global_state: State, client_eval: list[list[dict]],
                        cfg, pad_token_id: int, reducer: Reducer, rank: int = 0, world_size: int = 1) -> dict:
    """A metrics.jsonl row's share under eval.per_client: the pooled metrics (over the union of the
    slices), per-client summaries and every client's numbers. `cfg.max_batches` caps each client."""
    adapter.load(model, {k: t.to(reducer.device) for k, t in global_state.items()})
    size = cfg.per_device_eval_batch_size
    cap = cfg.max_batches * size if cfg.max_batches else None
    return per_client_row(score_clients(model, client_eval, size, pad_token_id, reducer, cap, rank, world_size))


def per_client_row(client_sums: torch.Tensor) -> dict:
    """From (clients, 3) sums: the pooled metrics, their spread over clients and every client's numbers."""
    report = per_client_report(client_sums)
    row = {k: v for k, v in report["pooled"].items() if k != "tokens"}
    for name, stats in report["spread"].items():
        row.update({f"{name}_client_{k}": v for k, v in stats.items() if k != "best"})
    row["eval_clients"] = [{k: c[k] for k in ("client", "eval_loss", "token_accuracy", "tokens") if k in c}
                           for c in report["clients"]]
    return row

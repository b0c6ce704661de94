"""Held-out evaluation of a global state: token-weighted loss, perplexity and next-token
accuracy on response tokens, sharded over ranks and summed. The package also holds
per-client evaluation (per_client), `fedllm eval` (run_eval), generations, benchmark tasks
and the comparison of runs."""
from __future__ import annotations

import torch

from fedllm.adapters.base import Adapter
from fedllm.data import collate
from fedllm.distributed import Reducer
from fedllm.state import State


@torch.no_grad()
def evaluate(model: torch.nn.Module, adapter: Adapter, global_state: State, examples: list[dict], cfg, pad_token_id: int,
             reducer: Reducer, rank: int = 0, world_size: int = 1) -> dict:
    """`cfg`: the recipe's eval: section. Every rank calls it; each scores its share of the batches."""
    adapter.load(model, {k: t.to(reducer.device) for k, t in global_state.items()})
    model.eval()
    size = cfg.per_device_eval_batch_size
    batches = [examples[i : i + size] for i in range(0, len(examples), size)][: cfg.max_batches]
    sums = torch.zeros(3, dtype=torch.float64)  # loss·tokens, tokens, correct
    for batch in batches[rank::world_size]:
        inputs = {k: v.to(reducer.device) for k, v in collate(batch, pad_token_id).items()}
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.float()
        labels = inputs["labels"][:, 1:]
        logits = logits[:, :-1]
        mask = labels != -100
        loss = torch.nn.functional.cross_entropy(logits[mask], labels[mask], reduction="sum")
        sums += torch.tensor([loss.item(), mask.sum().item(), (logits.argmax(-1)[mask] == labels[mask]).sum().item()], dtype=torch.float64)
    reducer.sum_(sums)
    loss_sum, tokens, correct = sums.tolist()
    if tokens == 0:
        return {}
    mean = loss_sum / tokens
    return {"eval_loss": mean, "perplexity": float(torch.tensor(mean).exp()), "token_accuracy": correct / tokens}

"""One round: sample, broadcast, run this rank's clients, collect real serialized messages,
aggregate (streamed weighted sum, all-reduced across ranks), and evaluation."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from fedllm.client import client_seed, local_round, round_learning_rate
from fedllm.data import collate
from fedllm.distributed import all_gather_rows, all_reduce_sum_
from fedllm.strategies.base import RoundInfo, State
from fedllm.wire import Message, WireContext, deserialize, serialize

log = logging.getLogger("fedllm")

STAT_COLUMNS = ("client", "num_samples", "train_loss", "bytes_up", "bytes_down", "accepted", "steps")


class WeightedSum:
    """Running Σ w_i·u_i in float64, so a round's memory does not grow with its clients
    and the sum does not depend (beyond fp64 rounding) on how clients split over ranks."""

    def __init__(self, template: State):
        # a canonical (sorted) layout: dicts read back from safetensors come in no fixed
        # order, and ranks all-reduce this buffer element by element
        self.shapes = {k: template[k].shape for k in sorted(template)}
        self.flat = torch.zeros(sum(t.numel() for t in template.values()) + 1, dtype=torch.float64)

    def add(self, update: State, weight: float) -> None:
        offset = 0
        for k, shape in self.shapes.items():
            n = shape.numel()
            self.flat[offset : offset + n].add_(update[k].reshape(-1).to("cpu", torch.float64), alpha=weight)
            offset += n
        self.flat[-1] += weight

    @property
    def total_weight(self) -> float:
        return float(self.flat[-1])

    def mean(self) -> State:
        out, offset = {}, 0
        for k, shape in self.shapes.items():
            n = shape.numel()
            out[k] = (self.flat[offset : offset + n] / self.flat[-1]).to(torch.float32).reshape(shape)
            offset += n
        return out


@dataclass
class RoundResult:
    global_state: State
    server_state: State
    stats: list[dict]
    seconds: float


def is_finite(update: State) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in update.values())


def send_update(fed, update: State, ctx: WireContext) -> tuple[State, int]:
    """Client → server: adapter encoding, the codec chain, real bytes, and back."""
    message = fed.adapter.encode(update, ctx)
    for codec in fed.codecs:
        message = codec.encode(message, ctx)
    wire = serialize(message)
    message = deserialize(wire)
    for codec in reversed(fed.codecs):
        message = codec.decode(message, ctx)
    return fed.adapter.decode(message, ctx), len(wire)


def run_round(fed, round: int, progress=None) -> RoundResult:
    start = time.perf_counter()
    r = fed.recipe
    sampled = fed.sampler.sample(round, r.federation.num_clients, r.federation.sampled_per_round(), r.seed)
    mine = sampled[fed.rank :: fed.world_size]  # a deterministic split of the round's clients

    download = serialize(fed.adapter.encode_global(fed.global_state))
    x_t = {k: t.to(fed.device) for k, t in fed.adapter.decode_global(deserialize(download)).items()}
    lr = round_learning_rate(r.client, round, r.federation.rounds)
    total = WeightedSum(x_t)
    rows = []
    for client_id in mine:
        fed.adapter.load(fed.model, x_t)
        fed.adapter.prepare_local_round(fed.model)
        result = local_round(
            fed.model, fed.params, x_t, fed.data.clients[client_id], r.client,
            lr=lr, seed=client_seed(r.seed, round, client_id), pad_token_id=fed.pad_token_id, device=fed.device,
            hooks=fed.strategy.client_hooks(round, client_id),
            optimizer_state=fed.store.get(client_id) if r.client.keep_optimizer_state else None,
        )
        if result.optimizer_state is not None:
            fed.store.put(client_id, result.optimizer_state)
        update, bytes_up = send_update(fed, result.update, WireContext(round, client_id, r.seed))
        accepted = is_finite(update)
        if accepted:
            total.add(update, result.num_samples)
        else:
            log.warning("round %d: client %d sent a non-finite update (NaN/Inf); dropped from the round", round, client_id)
        rows.append([client_id, result.num_samples, result.train_loss, bytes_up, len(download), accepted, result.steps])
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{result.train_loss:.3f}")

    all_reduce_sum_(total.flat, fed.device)
    stats_tensor = all_gather_rows(torch.tensor(rows, dtype=torch.float64).reshape(-1, len(STAT_COLUMNS)), fed.device)
    stats = [dict(zip(STAT_COLUMNS, row)) for row in stats_tensor.tolist()]
    for s in stats:
        s["client"], s["accepted"] = int(s["client"]), bool(s["accepted"])
    accepted = [s["client"] for s in stats if s["accepted"]]
    if not accepted:
        log.warning("round %d: no client update was accepted; the global model is unchanged", round)
        return RoundResult(fed.global_state, fed.server_state, stats, time.perf_counter() - start)
    info = RoundInfo(round, accepted, total.total_weight, r.federation.num_clients)
    new_global, server_state = fed.strategy.aggregate(
        {k: t.float() for k, t in fed.global_state.items()}, total.mean(), fed.server_state, info
    )
    new_global = {k: new_global[k].to(fed.global_state[k].dtype) for k in fed.global_state}
    return RoundResult(new_global, server_state, stats, time.perf_counter() - start)


@torch.no_grad()
def evaluate(fed, examples: list[dict]) -> dict:
    """Token-weighted loss, perplexity and next-token accuracy on response tokens, sharded
    over ranks and summed."""
    cfg = fed.recipe.eval
    fed.adapter.load(fed.model, {k: t.to(fed.device) for k, t in fed.global_state.items()})
    fed.model.eval()
    size = cfg.per_device_eval_batch_size
    batches = [examples[i : i + size] for i in range(0, len(examples), size)][: cfg.max_batches]
    sums = torch.zeros(3, dtype=torch.float64)  # loss·tokens, tokens, correct
    for batch in batches[fed.rank :: fed.world_size]:
        inputs = {k: v.to(fed.device) for k, v in collate(batch, fed.pad_token_id).items()}
        logits = fed.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.float()
        labels = inputs["labels"][:, 1:]
        logits = logits[:, :-1]
        mask = labels != -100
        loss = torch.nn.functional.cross_entropy(logits[mask], labels[mask], reduction="sum")
        sums += torch.tensor([loss.item(), mask.sum().item(), (logits.argmax(-1)[mask] == labels[mask]).sum().item()], dtype=torch.float64)
    all_reduce_sum_(sums, fed.device)
    loss_sum, tokens, correct = sums.tolist()
    if tokens == 0:
        return {}
    mean = loss_sum / tokens
    return {"eval_loss": mean, "perplexity": float(torch.tensor(mean).exp()), "token_accuracy": correct / tokens}

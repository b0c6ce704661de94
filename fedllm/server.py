"""One round: sample, broadcast, run this rank's clients, collect their real serialized
messages (fedllm.aggregation turns them into the new global state), and evaluation."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import torch

from fedllm.aggregation import collector, message_template
from fedllm.client import client_seed, local_round, mean_gradient, num_micro_batches, round_learning_rate
from fedllm.data import collate
from fedllm.distributed import all_gather_rows, all_reduce_sum_
from fedllm.strategies.base import ClientContext, ClientHooks, RoundInfo, State, split_prefix, with_prefix
from fedllm.wire import Message, WireContext, deserialize, serialize

log = logging.getLogger("fedllm")

# bytes_up/down are a client's whole traffic; split_bytes_* the part its local round itself
# exchanged with the server (split learning's activations and gradients), 0 for a plain loop
CODEC_PREFIX = "codec/"  # a codec's per-client state in the client store: codec/<index>/<key>
STAT_COLUMNS = (
    "client", "num_samples", "train_loss", "bytes_up", "bytes_down", "accepted", "steps", "split_bytes_up", "split_bytes_down",
)


@dataclass
class RoundResult:
    global_state: State
    server_state: State
    stats: list[dict]
    seconds: float


def send_update(fed, update: State, extras: State, ctx: WireContext, codec_state: State | None = None,
                decode: bool = True) -> tuple[State, int]:
    """Client → server: adapter encoding (+ the strategy's extras), the codec chain, real
    bytes, and back. Returns what the server decodes: the update and the prefixed extras
    (`decode=False`: the adapter's wire tensors, for aggregation in its coordinate space).
    `codec_state` (the client's stored codec state, `codec/<i>/...`) is updated in place."""
    message = fed.adapter.encode(update, ctx)
    message.tensors.update(with_prefix(extras))
    codec_state = {} if codec_state is None else codec_state
    for i, codec in enumerate(fed.codecs):
        prefix = f"{CODEC_PREFIX}{i}/"
        own = split_prefix(codec_state, prefix)[1]
        message = codec.encode(message, replace(ctx, state=own))
        codec_state.update(with_prefix(own, prefix))
    wire = serialize(message)
    del message  # for a full-parameter update, at most two full-size objects live at once
    message, size = deserialize(wire), len(wire)
    del wire
    for codec in reversed(fed.codecs):
        message = codec.decode(message, ctx)
    if not decode:
        return message.tensors, size
    plain, extras = split_prefix(message.tensors)
    return {**fed.adapter.decode(Message(plain, message.meta), ctx), **with_prefix(extras)}, size


def broadcast_round(fed) -> tuple[State, State, int]:
    """Server → clients: the global state (+ the strategy's broadcast tensors) as real bytes.
    Returns x^t and the broadcast as a client decodes them, and the message size."""
    message = fed.adapter.encode_global(fed.global_state)
    message.tensors.update(with_prefix(fed.strategy.broadcast(fed.server_state)))
    wire = serialize(message)
    message = deserialize(wire)
    plain, broadcast = split_prefix(message.tensors)
    x_t = fed.adapter.decode_global(Message(plain, message.meta))
    on_device = lambda state: {k: t.to(fed.device) for k, t in state.items()}  # noqa: E731
    return on_device(x_t), on_device(broadcast), len(wire)


def run_client(fed, round: int, client_id: int, x_t: State, broadcast: State, lr: float, on_step=None):
    """One client's local round on the resident model; returns its decoded message and stats."""
    r = fed.recipe
    fed.adapter.load(fed.model, x_t, fed.params)
    fed.adapter.prepare_local_round(fed.model)
    examples = fed.data.clients[client_id]
    stored, stored_codecs = split_prefix(fed.store.get(client_id) or {}, CODEC_PREFIX)
    stored_optim, stored_strategy = split_prefix(stored)
    hooks = fed.strategy.client_hooks(round, client_id) or ClientHooks()
    steps = hooks.num_steps(num_micro_batches(r.client, len(examples)) // r.client.gradient_accumulation_steps)

    def gradient(limit: int | None = None) -> State:
        chosen = examples[:limit]
        return mean_gradient(fed.model, fed.params, chosen, r.client.per_device_train_batch_size, fed.pad_token_id, fed.device)

    hooks.begin(fed.params, ClientContext(round, client_id, x_t, broadcast, stored_strategy, lr, steps, gradient))
    # an adapter whose local training is not the plain loop (split learning) brings its own
    train = getattr(fed.adapter, "local_round", None)
    extra = {"round": round, "client_id": client_id} if train is not None else {}
    result = (train or local_trainer(r.client))(
        fed.model, fed.params, x_t, examples, r.client, lr=lr, seed=client_seed(r.seed, round, client_id),
        pad_token_id=fed.pad_token_id, device=fed.device, hooks=hooks,
        optimizer_state=stored_optim if r.client.keep_optimizer_state else None, steps=steps, on_step=on_step, **extra,
    )
    if type(hooks).finish is not ClientHooks.finish:  # hooks may rewrite the update in place (DP clipping)
        result.update = dict(result.update)
    extras, client_state = hooks.finish(fed.params, result.update)
    codec_state = with_prefix(stored_codecs, CODEC_PREFIX)
    message, bytes_up = send_update(fed, result.update, extras, WireContext(round, client_id, r.seed), codec_state, not fed.compact)
    weight = 1.0 if fed.strategy.uniform_weights else float(result.num_samples)
    to_store = {**(result.optimizer_state or {}), **with_prefix(client_state or {}), **codec_state}
    return message, weight, result, bytes_up, to_store


def local_trainer(cfg):
    """The local round's runner: the built-in loop, or a transformers.Trainer (`client.trainer: hf`)."""
    if cfg.trainer == "hf":
        from fedllm.integrations.transformers import trainer_local_round

        return trainer_local_round
    return local_round


def run_round(fed, round: int, progress=None) -> RoundResult:
    """One round; `progress` (a tqdm bar, optional) advances by local steps."""
    start = time.perf_counter()
    r = fed.recipe
    sampled = fed.sampler.sample(round, r.federation.num_clients, r.federation.sampled_per_round(), r.seed)
    mine = sampled[fed.rank :: fed.world_size]  # a deterministic split of the round's clients
    x_t, broadcast, bytes_down = downlink(fed, round)
    lr = round_learning_rate(r.client, round, r.federation.rounds)
    collect = collector(fed, round, lambda: message_template(fed, x_t, broadcast, round, lr))
    rows = []
    for client_id in mine:
        on_step = (lambda: progress.update(1)) if progress is not None else None
        message, weight, result, bytes_up, to_store = run_client(fed, round, client_id, x_t, broadcast, lr, on_step)
        accepted = collect.add(client_id, message, weight)
        del message  # summed: it must not stay alive through the next client's training
        if not accepted:
            log.warning("round %d: client %d sent a non-finite update (NaN/Inf); dropped from the round", round, client_id)
        elif to_store:  # a dropped client's state does not advance either
            fed.store.put(client_id, to_store)
        split_up, split_down = result.split_bytes_up, result.split_bytes_down
        rows.append([
            client_id, result.num_samples, result.train_loss, bytes_up + split_up, bytes_down(client_id) + split_down, accepted,
            result.steps, split_up, split_down,
        ])
        if progress is not None:
            progress.set_postfix(clients=f"{len(rows)}/{len(mine)}", loss=f"{result.train_loss:.3f}")

    stats = gather_stats(rows, fed.device)
    accepted = [s["client"] for s in stats if s["accepted"]]
    if not accepted:
        log.warning("round %d: no client update was accepted; the global model is unchanged", round)
        collect.unchanged(fed)
        return RoundResult(fed.global_state, fed.server_state, stats, time.perf_counter() - start)
    local_steps = r.client.max_steps or 0
    info = lambda weight: RoundInfo(round, accepted, weight, r.federation.num_clients, lr=lr, local_steps=local_steps)  # noqa: E731
    new_global, server_state = collect.finish(fed, info)
    return RoundResult(new_global, server_state, stats, time.perf_counter() - start)


def downlink(fed, round: int):
    """x^t and the strategy's broadcast as clients hold them, and each client's download
    bytes: the global state as one message, or on the compact path (Ferret) the aggregates
    of the rounds the client missed, applied to its own copy (x^t is then the server's)."""
    if fed.compact:
        return fed.global_state, {}, lambda client_id: catch_up_bytes(fed, round, client_id)
    x_t, broadcast, size = broadcast_round(fed)
    return x_t, broadcast, lambda client_id: size


def catch_up_bytes(fed, round: int, client_id: int) -> int:
    """What a client downloads in the compact protocol to reach x^t: the aggregate of every
    round since it last took part (it then held that round's x; a new client holds x^0, the
    base weights), or the full state when that is smaller."""
    missed = sum(fed.broadcast_sizes[fed.last_round_taken(client_id, round) : round])
    return min(missed, fed.full_state_bytes()) if missed else 0


def gather_stats(rows: list, device) -> list[dict]:
    """Every rank's per-client rows (one value per STAT_COLUMNS entry), as dicts."""
    table = all_gather_rows(torch.tensor(rows, dtype=torch.float64).reshape(-1, len(STAT_COLUMNS)), device)
    stats = [dict(zip(STAT_COLUMNS, row)) for row in table.tolist()]
    for s in stats:
        s["client"], s["accepted"] = int(s["client"]), bool(s["accepted"])
    return stats


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

"""Personalised evaluation (`fedllm eval --personalize-steps k`): every client fine-tunes the
global model for k local steps on its own training shard, with the run's local loop and
optimizer settings but no strategy terms (plain local steps), and is scored on its own
held-out slice. The global model is restored between clients; nothing is written back."""
from __future__ import annotations

import torch

from fedllm.capabilities import local_loop
from fedllm.client import Client
from fedllm.data import PreparedData
from fedllm.distributed import Reducer
from fedllm.evaluation.per_client import per_client_report, score_clients
from fedllm.registry import STRATEGIES
from fedllm.state import ClientRecord, State
from fedllm.training import round_learning_rate


def personalized_report(model: torch.nn.Module, adapter, recipe, data: PreparedData, global_state: State, steps: int,
                        pad_token_id: int, batch_size: int, progress: bool = False) -> dict:
    """Per-client report after `steps` local steps from `global_state` (client i on its own slice)."""
    device = next(model.parameters()).device
    rounds = recipe.federation.rounds
    lr = round_learning_rate(recipe.client, rounds - 1, rounds)  # the rate of the run's last round
    cfg = recipe.client.model_copy(update={"max_steps": steps, "num_train_epochs": None})
    params = adapter.trainable(model)
    client = Client(model, params, adapter, STRATEGIES.build({"name": "fedavg"}, "strategy"),
                    local_loop(recipe, adapter), cfg, data.clients, pad_token_id, device, recipe.seed)
    reducer = Reducer(device)
    sums = torch.zeros(len(data.client_eval), 3, dtype=torch.float64)
    for cid, mine in enumerate(data.client_eval):
        # round index `rounds`: a local round after the run's last, so its data order is one no round used
        client.run(cid, rounds, global_state, {}, ClientRecord(), lr)
        only_mine = [examples if i == cid else [] for i, examples in enumerate(data.client_eval)]
        sums += score_clients(model, only_mine, batch_size, pad_token_id, reducer)
    adapter.load(model, {k: t.to(device) for k, t in global_state.items()})
    return {"steps": steps, "learning_rate": lr, **per_client_report(sums)}

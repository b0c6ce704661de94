"""The Trainer callback closes its rounds with the server's one round tail (fedllm.server), as
the engine does: under DP-FedAvg a round in which every update was rejected still releases
the server's noise and spends the privacy budget (before, the callback skipped aggregation
when nothing was accepted, so such a round added no noise and logged a smaller ε)."""
import logging
import math

import torch

from fedllm.registry import STRATEGIES
from fedllm.strategies.base import RoundInfo, RunInfo, Update
from tests.conftest import lora_for_trainer, train_with, trainable_copy

DP = {"name": "dp_fedavg", "clip_norm": 0.05}
PRIVACY = {"noise_multiplier": 1.0, "noise_seed": 1234}
LOCAL_STEPS, MAX_STEPS, BATCH = 2, 4, 4  # BATCH: train_with's


def engine_empty_rounds(start: dict, clients: int, rounds: int) -> list[tuple[dict, dict]]:
    """What the engine's tail gives for rounds that accepted nothing: DP-FedAvg's aggregate of an
    empty sum (a zero mean of total weight 0, as collectors.StreamedMean finishes it), round after
    round; (global state, metrics) after each."""
    strategy = STRATEGIES.build(DP, "strategy")
    strategy.setup(RunInfo(rounds=rounds, num_clients=1, clients_per_round=1, sampler="uniform", client_sizes=[clients],
                           local_steps=[LOCAL_STEPS], batch_size=BATCH, seed=0, privacy=PRIVACY))
    global_state, server_state, out = dict(start), strategy.init(start), []
    for t in range(rounds):
        zero = Update({k: torch.zeros_like(v, dtype=torch.float32) for k, v in global_state.items()}, {})
        new, server_state = strategy.aggregate({k: v.float() for k, v in global_state.items()}, zero, server_state,
                                               RoundInfo(t, [], 0.0, 1, local_steps=LOCAL_STEPS))
        global_state = {k: new[k].to(v.dtype) for k, v in global_state.items()}
        out.append((global_state, strategy.metrics(server_state)))
    return out


def test_a_round_with_every_update_rejected_adds_the_noise_and_spends_epsilon_as_the_engine(tmp_path, caplog):
    from transformers import TrainerCallback

    from fedllm.integrations import FederatedCallback

    model, tokenizer, rows = lora_for_trainer()
    start, synced = trainable_copy(model), []

    class PoisonBeforeSync(TrainerCallback):  # runs before the FederatedCallback's on_step_end: a NaN update
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % LOCAL_STEPS == 0:
                with torch.no_grad():
                    next(p for p in model.parameters() if p.requires_grad).fill_(math.nan)

    class AfterSync(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % LOCAL_STEPS == 0:
                synced.append(trainable_copy(model))

    fed = FederatedCallback(strategy=DP, local_steps=LOCAL_STEPS, privacy=PRIVACY)
    with caplog.at_level(logging.WARNING, logger="fedllm"):
        trainer = train_with(tmp_path, model, tokenizer, rows, [PoisonBeforeSync(), fed, AfterSync()], MAX_STEPS)
    rounds = [row for row in trainer.state.log_history if "fed/round" in row]
    assert [(r["fed/round"], r["fed/clients"], r["fed/rejected"]) for r in rounds] == [(1, 0, 1), (2, 0, 1)]
    assert "client 0 sent a non-finite update" in caplog.text
    expected = engine_empty_rounds(start, len(rows), MAX_STEPS // LOCAL_STEPS)
    assert len(synced) == len(expected) == 2
    for got, (want, metrics), logged in zip(synced, expected, rounds):
        assert all(torch.equal(got[k], want[k]) for k in want)  # the noise, bit for bit
        assert any(not torch.equal(got[k], start[k]) for k in start)  # ... which is really there
        assert {k: logged[f"fed/{k}"] for k in metrics} == metrics and metrics["epsilon"] > 0
    assert expected[1][1]["epsilon"] > expected[0][1]["epsilon"]  # the empty rounds spent budget

"""The Trainer callback closes its rounds with the server's one round tail (fedllm.server), as
the engine does: under DP-FedAvg a round in which every update was rejected still releases
the server's noise and spends the privacy budget (before, the callback skipped aggregation
when nothing was accepted, so such a round added no noise and logged a smaller ε)."""
import logging
import math

import torch

from fedllm.registry import STRATEGIES
from fedllm.strategies.base import RoundInfo, RunInfo, Update

DP = {"name": "dp_fedavg", "clip_norm": 0.05}
PRIVACY = {"noise_multiplier": 1.0, "noise_seed": 1234}
LOCAL_STEPS, MAX_STEPS, BATCH = 2, 4, 4


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
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from fedllm.adapters.lora import LoRA
    from fedllm.data import collate, prepare_data
    from fedllm.integrations import FederatedCallback
    from fedllm.models import byte_tokenizer, load_model
    from fedllm.recipe import DataConfig, ModelConfig

    tokenizer = byte_tokenizer()
    data = prepare_data(DataConfig(max_samples=60, max_length=64, eval_fraction=0.1), tokenizer, 1, seed=0)
    model = LoRA(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]).attach(
        load_model(ModelConfig(), tokenizer, seed=0), seed=0)
    trainable = lambda: {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}  # noqa: E731
    start, synced = trainable(), []

    class PoisonBeforeSync(TrainerCallback):  # runs before the FederatedCallback's on_step_end: a NaN update
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % LOCAL_STEPS == 0:
                with torch.no_grad():
                    next(p for p in model.parameters() if p.requires_grad).fill_(math.nan)

    class AfterSync(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % LOCAL_STEPS == 0:
                synced.append(trainable())

    args = TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=BATCH, max_steps=MAX_STEPS,
                             learning_rate=1e-2, use_cpu=True, report_to=[], disable_tqdm=True, logging_steps=1, seed=0,
                             save_strategy="no", lr_scheduler_type="constant", dataloader_num_workers=0)
    fed = FederatedCallback(strategy=DP, local_steps=LOCAL_STEPS, privacy=PRIVACY)
    trainer = Trainer(model=model, args=args, train_dataset=data.clients[0], callbacks=[PoisonBeforeSync(), fed, AfterSync()],
                      data_collator=lambda batch: collate(batch, tokenizer.pad_token_id))
    with caplog.at_level(logging.WARNING, logger="fedllm"):
        trainer.train()
    rounds = [row for row in trainer.state.log_history if "fed/round" in row]
    assert [(r["fed/round"], r["fed/clients"], r["fed/rejected"]) for r in rounds] == [(1, 0, 1), (2, 0, 1)]
    assert "client 0 sent a non-finite update" in caplog.text
    expected = engine_empty_rounds(start, len(data.clients[0]), MAX_STEPS // LOCAL_STEPS)
    assert len(synced) == len(expected) == 2
    for got, (want, metrics), logged in zip(synced, expected, rounds):
        assert all(torch.equal(got[k], want[k]) for k in want)  # the noise, bit for bit
        assert any(not torch.equal(got[k], start[k]) for k in start)  # ... which is really there
        assert {k: logged[f"fed/{k}"] for k in metrics} == metrics and metrics["epsilon"] > 0
    assert expected[1][1]["epsilon"] > expected[0][1]["epsilon"]  # the empty rounds spent budget

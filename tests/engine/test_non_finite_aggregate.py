"""A round whose aggregate is not finite is refused in every mode that aggregates: the sync
engine, the asynchronous and buffered event loops, and the Trainer callback keep the previous
global state, warn naming the round, and record the round's accepted clients as rejected
(`non_finite_aggregate`). The overflow is real: FedAvg's server_lr 1e39 is past float32's
largest number, so x + η_g·Δ is ±inf where Δ ≠ 0 and NaN where Δ = 0, although every client's
upload is finite. (The deployed server: tests/deploy/test_server_app.py.)"""
import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from fedllm.collectors import AGGREGATE_NOT_FINITE, finite_or_previous
from fedllm.engine import Federation
from fedllm.metrics import rejection_code
from fedllm.recipe import load_recipe
from tests.conftest import lora_for_trainer, train_with, trainable_copy

OVERFLOW = {"name": "fedavg", "server_lr": 1e39}
REFUSED = rejection_code(AGGREGATE_NOT_FINITE)


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_helper_takes_a_finite_pair_and_keeps_the_previous_one_otherwise(caplog):
    old = ({"w": torch.zeros(2)}, {"m": torch.ones(1)})
    new = ({"w": torch.tensor([1.0, 2.0])}, {"m": torch.tensor([3.0]), "step": torch.tensor(4)})  # an int tensor too
    assert finite_or_previous("round 1", new, old, [0, 1]) == (*new, True)
    for bad in (({"w": torch.tensor([1.0, float("inf")])}, new[1]), (new[0], {"m": torch.tensor([float("nan")])})):
        with caplog.at_level(logging.WARNING, logger="fedllm"):
            assert finite_or_previous("round 3", bad, old, [0, 1]) == (*old, False)  # server state alone counts too
        assert "round 3: the aggregate of clients [0, 1] is not finite" in caplog.text
        caplog.clear()
    with pytest.raises(RuntimeError, match="round 2: .* applied it in place: the run stops"):
        finite_or_previous("round 2", ({"w": torch.tensor([float("nan")])}, {}), None, [4])


def test_sync_rounds_that_overflow_keep_the_global_state_and_record_the_clients_rejected(recipe_file, tmp_path, caplog):
    fed = Federation(load_recipe(recipe_file(strategy=OVERFLOW)), tmp_path / "run")
    fed.start()
    start = {k: t.clone() for k, t in fed.global_state.items()}
    with caplog.at_level(logging.WARNING, logger="fedllm"):
        rows = fed.run()
    assert same(fed.global_state, start) and all(torch.isfinite(t).all() for t in fed.global_state.values())
    for t, row in enumerate(rows):
        clients = fed.participation.sampled(t)
        assert row["rejected"] == {AGGREGATE_NOT_FINITE: clients} and row["dropped"] == len(clients)
        assert f"round {t + 1}: the aggregate of clients {clients} is not finite" in caplog.text
        assert row["eval_loss"] == rows[0]["eval_loss"]  # evaluated on the kept global state, a number
    ledger = [json.loads(line) for line in (fed.run_dir / "ledger.jsonl").read_text().splitlines()]
    assert {r.get("rejected") for r in ledger} == {AGGREGATE_NOT_FINITE}
    final = load_file(str(fed.run_dir / "final" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in final.values())


def test_a_refused_round_leaves_its_clients_stored_state_as_it_was(recipe_file, tmp_path):
    """Each client's optimizer moments advance only with a round that applied its upload: a
    round whose aggregate is refused puts back what the clients held before it."""
    path = recipe_file(client={"keep_optimizer_state": True}, federation={"rounds": 2})
    fed = Federation(load_recipe(path), tmp_path / "run")
    fed.start()
    fed.run_round(0)  # an applied round: the sampled clients now hold moments
    held = {c: {k: t.clone() for k, t in fed.store.get(c).items()} for c in fed.store.ids()}
    assert held
    fed.strategy.server_lr = 1e39  # the next aggregate overflows and is refused
    rows = fed.run_round(1).stats
    assert rows and not any(r.accepted for r in rows)
    assert set(fed.store.ids()) == set(held)  # a client first sampled now stores nothing
    for c, state in held.items():
        assert same(fed.store.get(c), state), c


@pytest.mark.parametrize("mode", ["async", "buffered"])
def test_asynchronous_events_that_overflow_make_no_server_version(recipe_file, tmp_path, caplog, mode):
    federation = {"rounds": 2, "num_clients": 4, "clients_per_round": 2, "mode": mode, "max_concurrency": 2,
                  "devices": {"profile": "lognormal", "sigma": 1.0}, "staleness": {"name": "polynomial"}}
    fed = Federation(load_recipe(recipe_file(strategy=OVERFLOW, federation=federation)), tmp_path / "run")
    fed.start()
    start = {k: t.clone() for k, t in fed.global_state.items()}
    with caplog.at_level(logging.WARNING, logger="fedllm"):
        rows = fed.run()
    assert same(fed.global_state, start)
    assert [r["server_version"] for r in rows] == [0, 0]  # no event was applied
    for row in rows:
        assert row["dropped"] == row["clients"] and sorted(sum(row["rejected"].values(), [])) == sorted(
            row["rejected"][AGGREGATE_NOT_FINITE])
    assert "(server version 1): the aggregate of clients" in caplog.text


def test_the_trainer_callback_keeps_the_global_state_of_an_overflowing_round(tmp_path, caplog):
    from transformers import TrainerCallback

    from fedllm.integrations import FederatedCallback

    model, tokenizer, rows = lora_for_trainer()
    start, synced = trainable_copy(model), []

    class AfterSync(TrainerCallback):  # runs after the FederatedCallback's on_step_end
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % 2 == 0:
                synced.append(trainable_copy(model))

    with caplog.at_level(logging.WARNING, logger="fedllm"):
        trainer = train_with(tmp_path, model, tokenizer, rows,
                             [FederatedCallback(strategy=OVERFLOW, local_steps=2), AfterSync()])
    assert len(synced) == 2 and all(same(s, start) for s in synced)  # each round's local steps undone, nothing applied
    rounds = [row for row in trainer.state.log_history if "fed/round" in row]
    assert [(r["fed/round"], r["fed/clients"], r["fed/rejected"]) for r in rounds] == [(1, 0, 1), (2, 0, 1)]
    assert "round 1: the aggregate of clients [0] is not finite" in caplog.text

"""The simulation engine end to end on the tiny preset."""
import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from fedllm.codecs.base import Codec
from fedllm.engine import Federation, run_recipe
from fedllm.export import export_run
from fedllm.models import build_model, load_model
from fedllm.recipe import load_recipe
from fedllm.registry import CODECS
from fedllm.wire import Message


def run(recipe_file, **sections):
    path = recipe_file(**sections)
    run_dir = run_recipe(str(path))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return run_dir, rows


def test_a_run_writes_every_output_and_counts_real_bytes(recipe_file):
    run_dir, rows = run(recipe_file)
    assert [r["round"] for r in rows] == [1, 2, 3]
    for name in ("recipe.yaml", "run_meta.json", "ledger.jsonl", "final/adapter_model.safetensors", "final/adapter_config.json"):
        assert (run_dir / name).exists(), name
    ledger = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    assert len(ledger) == 3 * 2
    # the upload is the serialized update: every LoRA tensor in fp32 plus a safetensors header
    fed_params = json.loads((run_dir / "run_meta.json").read_text())["trainable_parameters"]
    assert all(4 * fed_params < e["bytes_up"] < 4 * fed_params + 8192 for e in ledger)
    assert rows[0]["bytes_up"] == sum(e["bytes_up"] for e in ledger if e["round"] == 1)
    assert {"train_loss", "eval_loss", "perplexity", "token_accuracy", "seconds"} <= rows[-1].keys()


def test_the_eval_loss_falls_over_rounds(recipe_file):
    _, rows = run(recipe_file, federation={"rounds": 4}, client={"max_steps": 6, "learning_rate": 0.01})
    losses = [r["eval_loss"] for r in rows]
    assert losses[-1] < losses[0] - 0.2, losses


NAN_CLIENT = 1


@CODECS.register("test_nan_for_client_1")
class NaNForClient1(Codec):
    """Test codec: client 1's upload turns into NaN on the wire."""

    def encode(self, message: Message, ctx) -> Message:
        if ctx.client_id == NAN_CLIENT:
            return Message({k: torch.full_like(t, float("nan")) for k, t in message.tensors.items()}, message.meta)
        return message

    def decode(self, message, ctx):
        return message


def test_a_client_sending_nan_is_dropped_and_the_round_goes_on(recipe_file, caplog):
    caplog.set_level("WARNING", logger="fedllm")
    run_dir, rows = run(recipe_file, codecs=[{"name": "test_nan_for_client_1"}], federation={"num_clients": 2, "clients_per_round": 2})
    assert all(r["dropped"] == 1 and r["clients"] == 2 for r in rows)
    assert "client 1 sent a non-finite update" in caplog.text
    final = load_file(str(run_dir / "final/adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in final.values())
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]


def test_export_loads_with_peft_and_gives_the_engine_logits(recipe_file, tmp_path):
    run_dir, _ = run(recipe_file, adapter={"name": "ffa_lora", "r": 4, "alpha": 4})
    out = export_run(str(run_dir), str(tmp_path / "exported"))
    recipe = load_recipe(run_dir / "recipe.yaml")
    tokenizer, model, adapter = build_model(recipe)
    from fedllm.state import checkpoint_dirs, read_checkpoint

    parts, _ = read_checkpoint(checkpoint_dirs(run_dir)[-1])
    adapter.load(model, parts["global"])
    reloaded = PeftModel.from_pretrained(load_model(recipe.model, tokenizer, recipe.seed), str(out))
    ids = tokenizer(["### Instruction: say hi", "hello"], padding=True, return_tensors="pt")
    model.eval(), reloaded.eval()
    with torch.no_grad():
        expected, got = model(**ids).logits, reloaded(**ids).logits
    assert torch.equal(expected, got)
    base = load_model(recipe.model, tokenizer, recipe.seed)
    with torch.no_grad():
        assert not torch.allclose(base(**ids).logits, got)  # the adapter really changed the model


def test_keep_optimizer_state_stores_each_clients_moments(recipe_file, tmp_path):
    path = recipe_file(client={"keep_optimizer_state": True}, federation={"rounds": 2})
    fed = Federation(load_recipe(path), tmp_path / "runs" / "run")
    fed.start()
    fed.run()
    assert len(fed.store) > 0
    state = fed.store.get(fed.store.ids()[0])
    assert any(k.endswith("exp_avg_sq") for k in state) and any(k.endswith(".step") for k in state)


def test_report_to_tensorboard_logs_the_round_metrics(recipe_file):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, rows = run(recipe_file, output={"report_to": ["tensorboard"]}, federation={"rounds": 2})
    events = EventAccumulator(str(next(run_dir.rglob("events.out.tfevents*"))))
    events.Reload()
    logged = [e.value for e in events.Scalars("eval_loss")]
    assert logged == pytest.approx([r["eval_loss"] for r in rows])


def test_gradient_checkpointing_gives_the_same_training_and_bf16_runs(recipe_file, tmp_path):
    plain, _ = run(recipe_file, federation={"rounds": 1}, output={"name": "plain"})
    ckpt, _ = run(recipe_file, federation={"rounds": 1}, client={"gradient_checkpointing": True}, output={"name": "ckpt"})
    a = load_file(str(plain / "final/adapter_model.safetensors"))
    b = load_file(str(ckpt / "final/adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
    _, rows = run(recipe_file, federation={"rounds": 2}, client={"bf16": True}, output={"name": "bf16"})
    assert all(r["dropped"] == 0 for r in rows) and rows[-1]["eval_loss"] < rows[0]["eval_loss"]


def test_merged_export_reproduces_the_adapted_logits(recipe_file, tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir, _ = run(recipe_file, federation={"rounds": 1})
    recipe = load_recipe(run_dir / "recipe.yaml")
    tokenizer, model, adapter = build_model(recipe)
    from fedllm.state import checkpoint_dirs, read_checkpoint

    adapter.load(model, read_checkpoint(checkpoint_dirs(run_dir)[-1])[0]["global"])
    merged = AutoModelForCausalLM.from_pretrained(str(export_run(str(run_dir), str(tmp_path / "merged"), fmt="merged")))
    ids = tokenizer(["### Instruction: merge me"], return_tensors="pt")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**ids).logits, model(**ids).logits, rtol=1e-4, atol=1e-5)

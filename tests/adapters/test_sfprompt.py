"""SFPrompt: the U-shaped split against the unsplit model and peft prompt tuning, where
gradients go, EL2N pruning, the bytes that cross the cut, export, and a federated run."""
import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel, PromptTuningConfig, get_peft_model

import fedllm.adapters.sfprompt.adapter as sfprompt
from fedllm.adapters.sfprompt.split import SplitLM, token_logits
from fedllm.data import collate
from fedllm.engine import run_recipe
from fedllm.models import byte_tokenizer, load_model
from fedllm.recipe import ClientConfig, ModelConfig, load_recipe
from fedllm.registry import ADAPTERS
from fedllm.strategies.base import ClientHooks
from fedllm.training import LocalJob, StepDriver, client_seed
from fedllm.wire import Message, serialize

from tests.conftest import tiny_recipe

RECIPES = Path(__file__).parents[2] / "recipes"
TOKENIZER = byte_tokenizer()
TEXTS = ["### Instruction: name a colour\n### Response: blue", "hi", "### Instruction: add 2 and 3\n### Response: 5",
         "the quick brown fox", "a b c d e f", "why is the sky blue?", "ok", "federated prompts"]
ARCHS = ["tiny-llama", "tiny-gpt2"]


def base(name):
    return load_model(ModelConfig(name=name), TOKENIZER, 0).eval()


def batch(texts=TEXTS[:3]):
    return TOKENIZER(texts, padding=True, return_tensors="pt")


def examples(texts=TEXTS):
    """Token ids with the first third of each example unlabelled (completion-only)."""
    out = []
    for text in texts:
        ids = TOKENIZER(text)["input_ids"] + [TOKENIZER.eos_token_id]
        cut = len(ids) // 3
        out.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
    return out


def adapter(**options):
    return ADAPTERS.build({"name": "sfprompt", **options})


def prompted(name, **options):
    sf = adapter(**options)
    return sf, sf.attach(base(name), seed=0)


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("head, tail", [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_without_a_prompt_head_body_tail_is_the_unsplit_model(name, head, tail):
    model, ids = base(name), batch()
    with torch.no_grad():
        assert torch.equal(SplitLM(model, head, tail).forward(ids["input_ids"], ids["attention_mask"], None), model(**ids).logits)


@pytest.mark.parametrize("name", ARCHS)
def test_with_a_prompt_the_split_gives_peft_prompt_tunings_logits(name):
    sf, model = prompted(name, num_virtual_tokens=5, head_layers=1, tail_layers=0)
    model.eval()
    peft_model = get_peft_model(base(name), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)).eval()
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(model.prompt)
        ids = batch()  # padded rows: the extended mask must hide the same positions in both
        expected = peft_model(**ids).logits[:, 5:]
        got = model(**ids).logits
        shortcut = token_logits(model.split.shortcut(ids["input_ids"], ids["attention_mask"], model.prompt), 5)
    assert got.shape == expected.shape == (3, ids["input_ids"].shape[1], len(TOKENIZER))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # the local-loss path skips the body (block 1): a different function of the same prompt
    assert shortcut.shape == got.shape and not torch.allclose(shortcut, expected, atol=1e-3)


@pytest.mark.parametrize("name", ARCHS)
def test_gradients_reach_the_prompt_and_enabled_tail_only_and_match_the_unsplit_ones(name):
    sf, model = prompted(name, num_virtual_tokens=4, head_layers=1, tail_layers=0, train_tail="norms")
    model.eval()  # no dropout: the split and the unsplit pass must see the same function
    inputs = collate(examples()[:4], TOKENIZER.pad_token_id)
    model(**inputs).loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    sfprompt.split_step(model, inputs, sfprompt.Cut())
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    final_norm = "base.model.norm.weight" if name == "tiny-llama" else "base.transformer.ln_f.weight"
    assert set(grads) == {"prompt", final_norm} | ({"base.transformer.ln_f.bias"} if name == "tiny-gpt2" else set())
    assert grads["prompt"].abs().sum() > 0
    for n in grads:  # the serialize → deserialize trips change nothing in the gradient
        torch.testing.assert_close(grads[n], reference[n], rtol=1e-5, atol=1e-7)
    body = [model.split.blocks[i] for i in model.split.body_blocks]
    assert body and all(p.grad is None and not p.requires_grad for b in body for p in b.parameters())


def test_pruning_keeps_exactly_the_highest_el2n_fraction():
    sf, model = prompted("tiny-llama", num_virtual_tokens=4, head_layers=1, tail_layers=0, keep_ratio=0.4)
    data = examples()
    kept = sf.prune(model, data, ClientConfig(per_device_train_batch_size=3), TOKENIZER.pad_token_id, torch.device("cpu"), 0, 7)
    # reference EL2N with an explicit one-hot, one example at a time, unpadded
    scores = []
    with torch.no_grad():
        for e in data:
            ids = torch.tensor([e["input_ids"]])
            logits = token_logits(model.split.shortcut(ids, torch.ones_like(ids), model.prompt), 4)[0, :-1]
            target = torch.tensor(e["labels"][1:])
            on = target != -100
            err = logits[on].softmax(-1) - torch.nn.functional.one_hot(target[on], len(TOKENIZER)).float()
            scores.append(err.norm(dim=-1).mean().item())
    hardest = sorted(range(len(data)), key=lambda i: -scores[i])[:3]
    assert len(kept) == 3 == round(0.4 * len(data))
    assert [data.index(e) for e in kept] == sorted(hardest)
    assert min(scores[i] for i in hardest) > max(s for i, s in enumerate(scores) if i not in hardest)


def test_split_bytes_are_the_serialized_activations_and_gradients(monkeypatch):
    sf, model = prompted("tiny-llama", num_virtual_tokens=4, head_layers=1, tail_layers=0, keep_ratio=0.5,
                         local_loss_steps=1, split_steps=2)
    sent = []
    monkeypatch.setattr(sfprompt, "serialize", lambda m: sent.append(m) or serialize(m))
    params = sf.trainable(model)
    x_t = sf.state(model)
    cfg = ClientConfig(per_device_train_batch_size=2, learning_rate=0.01)
    job = LocalJob(model, params, x_t, examples(), cfg, lr=0.01, seed=client_seed(0, 0, 1), steps=2, optimizer_state=None,
                   pad_token_id=TOKENIZER.pad_token_id, device=torch.device("cpu"), round=0, client_id=1)
    result = sf.local_loop().train(job, StepDriver(ClientHooks(), params, cfg.max_grad_norm))
    # 2 split steps × (activations + mask up, body output down, its gradient up, the body input's gradient down)
    names = [tuple(sorted(m.tensors)) for m in sent]
    assert names == [("attention_mask", "hidden"), ("hidden",), ("grad",), ("grad",)] * 2
    up = sum(len(serialize(m)) for i, m in enumerate(sent) if i % 4 in (0, 2))
    down = sum(len(serialize(m)) for i, m in enumerate(sent) if i % 4 in (1, 3))
    assert (result.split_bytes_up, result.split_bytes_down) == (up, down)
    # payloads: fp32 (2, 4 + T, 64) activations and gradients, a bool mask; headers < 200 bytes each
    payload = sum(t.numel() * t.element_size() for m in sent for t in m.tensors.values())
    assert payload < up + down < payload + 8 * 200
    widths = [m.tensors["hidden"].shape for m in sent[::4]]
    assert all(s[0] == 2 and s[2] == 64 and s[1] > 4 for s in widths)
    assert result.num_samples == 4 and result.steps == 3 and set(result.update) == {"prompt"}
    assert result.update["prompt"].abs().sum() > 0


def test_export_loads_with_peft_and_gives_the_split_models_logits(tmp_path):
    sf, model = prompted("tiny-gpt2", num_virtual_tokens=6, head_layers=1, tail_layers=1)
    with torch.no_grad():
        model.prompt.add_(0.05 * torch.randn_like(model.prompt))
    sf.export(model, str(tmp_path))
    assert model.prompt.requires_grad and not any(p.requires_grad for p in model.base.parameters())
    split = json.loads((tmp_path / sfprompt.SPLIT_CONFIG).read_text())
    assert split["head_blocks"] == [0] and split["body_blocks"] == [] and split["tail_blocks"] == [1]
    reloaded = PeftModel.from_pretrained(base("tiny-gpt2"), str(tmp_path)).eval()
    model.eval()
    ids = batch()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**ids).logits[:, 6:], model(**ids).logits, rtol=0, atol=1e-6)


def test_the_recipes_validate():
    for name in ("sfprompt_quickstart.yaml", "sfprompt_dolly.yaml"):
        recipe = load_recipe(RECIPES / name)
        assert recipe.adapter["name"] == "sfprompt"
    assert yaml.safe_load((RECIPES / "sfprompt_dolly.yaml").read_text())["adapter"]["head_layers"] == 2


def test_a_federated_run_counts_split_bytes_and_lowers_the_eval_loss(tmp_path):
    """Needs the engine to run the adapter's own loop and log its split bytes."""
    recipe = tiny_recipe(
        tmp_path,
        data={"max_samples": 80, "max_length": 64},
        adapter={"name": "sfprompt", "num_virtual_tokens": 4, "head_layers": 1, "tail_layers": 0, "keep_ratio": 0.5,
                 "local_loss_steps": 1, "split_steps": 5},
        federation={"rounds": 3, "num_clients": 2, "clients_per_round": 2},
        client={"learning_rate": 0.03, "per_device_train_batch_size": 4},
        output={"checkpoint_every": 0},
    )
    recipe["adapter"] = {k: v for k, v in recipe["adapter"].items() if k not in ("r", "alpha", "dropout", "target_modules")}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_dir = run_recipe(str(path))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ledger = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    prompt_message = len(serialize(Message({"prompt": torch.zeros(4, 64)})))
    for e in ledger:  # the prompt sync plus the split phase, per client and round
        assert e["bytes_up"] == prompt_message + e["split_bytes_up"] and e["split_bytes_up"] > 5 * 2 * 4 * 4 * 64
        assert e["bytes_down"] == prompt_message + e["split_bytes_down"]
    losses = [r["eval_loss"] for r in rows]  # measured: 5.129, 5.048, 4.992
    assert losses[-1] < losses[0] - 0.05, losses

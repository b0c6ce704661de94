"""lm-evaluation-harness on the in-memory PEFT model (skipped without the `fedllm[eval]` extra):
the bundled offline task runs, and its loglikelihoods equal fedllm's own scorer's."""
import pytest
import torch

from fedllm.data import tokenize_examples
from fedllm.evaluation import harness
from fedllm.evaluation.per_client import example_sums
from fedllm.models import build_model
from fedllm.recipe import recipe_from_dict

lm_eval = pytest.importorskip("lm_eval")
pytestmark = pytest.mark.slow  # lm-eval builds its datasets and (for an unknown name) indexes every task


def peft_model():
    recipe = recipe_from_dict({"adapter": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0}})
    tokenizer, model, adapter = build_model(recipe)
    with torch.no_grad():  # a trained-looking adapter: B away from its zero init
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    return tokenizer, model


def test_the_bundled_tasks_loglikelihoods_equal_our_scorers():
    tokenizer, model = peft_model()
    limit = 8
    out = harness.run(model, tokenizer, ["fedllm_quickstart_ll"], batch_size=4, limit=limit, log_samples=True)
    samples = sorted(out["fedllm_quickstart_ll"]["samples"], key=lambda s: s["doc_id"])
    theirs = [s["filtered_resps"][0][0] for s in samples]
    items = harness.quickstart_items()[:limit]
    # the same split of context and continuation as lm-eval's: the prompt's trailing "\n" moves to
    # the continuation; no <bos>, no </s>
    spans = [[(i["prompt"].rstrip(), False), ("\n" + i["response"], True)] for i in items]
    examples = tokenize_examples(spans, tokenizer, 1024, add_special_tokens=False)
    ours = (-example_sums(model, examples, 4, tokenizer.pad_token_id, torch.device("cpu"))[:, 0]).tolist()
    assert theirs == pytest.approx(ours, abs=1e-4)
    assert max(abs(t) for t in theirs) > 10  # real scores, not a trivial agreement


def test_the_bundled_group_runs_offline_with_every_kind():
    tokenizer, model = peft_model()
    out = harness.run(model, tokenizer, [harness.GROUP], batch_size=4, limit=4)
    assert set(out) == set(harness.BUNDLED) - {harness.GROUP}
    assert 0 <= out[f"{harness.GROUP}_mc"]["metrics"]["acc"] <= 1
    assert 0 <= out[f"{harness.GROUP}_gen"]["metrics"]["exact_match"] <= 1
    # a random-init byte model is near uniform over its 259 tokens: ~8 bits per byte
    assert 4 < out[f"{harness.GROUP}_ppl"]["metrics"]["bits_per_byte"] < 12
    assert out[f"{harness.GROUP}_ll"]["items"] == 4


def test_an_unknown_task_is_named_with_the_bundled_ones():
    from fedllm.evaluation.tasks import check_tasks
    from fedllm.registry import RecipeError

    with pytest.raises(RecipeError, match="unknown task 'fedllm_quikstart'.*did you mean 'fedllm_quickstart'"):
        check_tasks(["fedllm_quikstart"])

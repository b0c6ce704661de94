"""FlowerTune's general-NLP protocol: the recipe is its baseline, and the MMLU scoring (prompt,
greedy letter, answer extraction, accuracy per category) runs on a local miniature copy."""
import csv
import json
from pathlib import Path

import pytest
import torch

from fedllm.evaluation.flowertune import extract_answer, prompt, run_general_nlp
from fedllm.models import byte_tokenizer
from fedllm.recipe import load_recipe

RECIPE = Path(__file__).parents[2] / "recipes" / "flowertune_general_nlp.yaml"


class AlwaysB(torch.nn.Module):
    """A stand-in model whose greedy answer is always the letter B."""

    def __init__(self, tokenizer):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.answer = tokenizer("B", add_special_tokens=False)["input_ids"]
        self.prompts = []

    def generate(self, input_ids, attention_mask, max_new_tokens, **options):
        assert options["do_sample"] is False and max_new_tokens == len(self.answer)
        self.prompts += [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)]
        return torch.cat([input_ids, torch.tensor([self.answer] * len(input_ids))], dim=1)


def miniature_mmlu(root: Path) -> Path:
    rows = [{"input": f"What is {i} + {i}", "A": "1", "B": str(2 * i), "C": "3", "D": "4", "target": t}
            for i, t in enumerate("ABB")]
    (root / "abstract_algebra.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))  # stem: 2/3 are B
    cais = [{"question": "Who studies society?", "choices": ["a", "b", "c", "d"], "answer": a} for a in (1, 2)]
    (root / "sociology.jsonl").write_text("".join(json.dumps(r) + "\n" for r in cais))  # social sciences: 1/2
    with open(root / "philosophy.csv", "w", newline="") as f:  # humanities: 1/1
        writer = csv.DictWriter(f, ["input", "A", "B", "C", "D", "target"])
        writer.writeheader()
        writer.writerow({"input": "Who wrote the Republic.", "A": "x", "B": "Plato", "C": "y", "D": "z", "target": "B"})
    return root


def test_the_mmlu_scoring_on_a_miniature_copy(tmp_path):
    tokenizer = byte_tokenizer()
    model = AlwaysB(tokenizer)
    result = run_general_nlp(model, tokenizer, str(miniature_mmlu(tmp_path)), batch_size=2, progress=False, out_dir=tmp_path)
    assert result["metrics"] == pytest.approx({"stem": 2 / 3, "social_sciences": 0.5, "humanities": 1.0,
                                               "average": (2 / 3 + 0.5 + 1.0) / 3})
    assert result["questions"] == {"stem": 3, "social_sciences": 2, "humanities": 1}
    assert "anatomy" in result["subjects_missing"] and "sociology" not in result["subjects_missing"]
    assert tokenizer.decode(model.prompts[0]) == prompt("What is 0 + 0", ["1", "0", "3", "4"])
    lines = (tmp_path / "flowertune_general_nlp.jsonl").read_text().splitlines()
    assert len(lines) == 6 and json.loads(lines[0])["prediction"] == "b"


def test_the_prompt_is_flowertunes():
    assert prompt("What is 1 + 1", ["1", "2", "3", "4"]) == (
        "<|im_start|>question\nAnswer the following multiple choice question.\nQuestion: What is 1 + 1?\n\n"
        "Options:\nA. 1\nB. 2\nC. 3\nD. 4\nThe answer is:\n<|im_end|>\n<|im_start|>answer\n")


@pytest.mark.parametrize("output,prediction", [
    ("B", "b"), (" (c) because", "c"), ("blah\n## D\nmore", "d"), ("Zebra", "zebra"), ("", ""), ("42", "42"),
])
def test_answer_extraction_follows_flowertunes_rule(output, prediction):
    assert extract_answer(output, "B") == (prediction, "b")


def test_the_recipe_is_flowertunes_baseline(monkeypatch):
    from transformers import BitsAndBytesConfig

    import fedllm.models

    recipe = load_recipe(RECIPE)
    assert recipe.adapter["target_modules"] is None and (recipe.adapter["r"], recipe.adapter["alpha"]) == (32, 64)
    assert recipe.data.path == "flwrlabs/alpaca-gpt4" and recipe.data.eval_fraction == 0.0
    assert recipe.data.partitioner == {"name": "iid_contiguous", "shuffle_seed": 42}
    assert (recipe.federation.num_clients, recipe.federation.sampled_per_round(), recipe.federation.rounds) == (20, 2, 200)
    monkeypatch.setattr(fedllm.models, "check_quantization", lambda cfg: None)  # no CUDA needed to build the config
    ours, theirs = fedllm.models._quantization_config(recipe.model), BitsAndBytesConfig(load_in_4bit=True)
    for key in ("load_in_4bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype"):
        assert getattr(ours, key) == getattr(theirs, key), key


@pytest.mark.slow
def test_fedllm_eval_runs_the_task_on_a_runs_model(pooled_run, tmp_path, capsys):
    from fedllm.cli import main

    assert main(["eval", str(pooled_run), "--tasks", "flowertune-general-nlp", "--task-data",
                 str(miniature_mmlu(tmp_path)), "--no-progress"]) == 0
    task = json.loads((pooled_run / "eval" / "round_2" / "results.json").read_text())["tasks"]["flowertune-general-nlp"]
    assert set(task["metrics"]) == {"stem", "social_sciences", "humanities", "average"}
    assert "task flowertune-general-nlp" in capsys.readouterr().out
    assert (pooled_run / "eval" / "round_2" / "flowertune_general_nlp.jsonl").exists()

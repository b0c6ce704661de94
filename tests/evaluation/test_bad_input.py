"""`fedllm eval` on bad input: one line naming the problem and the fix, exit 2, no traceback."""
import importlib.util
import json
import shutil

import pytest

from fedllm.cli import main

pytestmark = pytest.mark.slow


def fails_with(argv, capsys, *fragments):
    assert main(argv) == 2
    full = capsys.readouterr().err
    err = full.splitlines()[-1]  # (above it: a datasets progress bar, if any)
    assert err.startswith("fedllm: error: ") and "Traceback" not in full, full
    for fragment in fragments:
        assert fragment in err, err


def test_a_round_without_a_checkpoint_lists_the_available_ones(pooled_run, capsys):
    fails_with(["eval", str(pooled_run), "--round", "7"], capsys, "no checkpoint of round 7", "[1, 2]")


def test_a_run_that_has_no_checkpoint_yet_points_to_base(pooled_run, tmp_path, capsys):
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copy(pooled_run / "recipe.yaml", fresh / "recipe.yaml")
    fails_with(["eval", str(fresh)], capsys, "has no checkpoint yet", "--base")
    fails_with(["eval", str(tmp_path)], capsys, "not a fedllm run directory")


def test_a_dataset_missing_columns_names_them_and_the_option(pooled_run, tmp_path, capsys):
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}", "answer": "a"}) + "\n" for i in range(4)))
    fails_with(["eval", str(pooled_run), "--data", str(data)], capsys, "'instruction' column", "question", "--format")


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is not None, reason="checks the message without lm-eval")
def test_an_unknown_task_without_lm_eval_names_fedllms_tasks_and_the_extra(pooled_run, capsys):
    fails_with(["eval", str(pooled_run), "--tasks", "mmlu_tyop"], capsys, "pip install 'fedllm[eval]'", "flowertune-general-nlp")


def test_per_client_options_on_a_pooled_run_say_what_is_needed(pooled_run, capsys):
    fails_with(["eval", str(pooled_run), "--personalize-steps", "2"], capsys, "eval.per_client: true")

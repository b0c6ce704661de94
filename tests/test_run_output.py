"""A run says where it lives first, reports each round in one line when no terminal shows a
progress bar, and ends with a summary; rounds are numbered from 1 everywhere; plots carry a
title and labels; a LoRA attach raises no library warning."""
import json
import logging
import warnings

import pytest

from fedllm.adapters.lora import LoRA
from fedllm.cli import main
from fedllm.metrics import human_bytes, run_title, show_progress
from fedllm.models import byte_tokenizer, load_model
from fedllm.recipe import ModelConfig
from fedllm.summary import run_summary


@pytest.fixture
def two_rounds(recipe_file, caplog, capsys):
    path = recipe_file(federation={"rounds": 2}, eval={"every": 1})
    with caplog.at_level(logging.INFO, logger="fedllm"):
        assert main(["run", str(path)]) == 0
    return path.parent / "runs" / "run", [r.getMessage() for r in caplog.records], capsys.readouterr().out


def test_the_run_directory_comes_first_and_each_round_is_one_line(two_rounds):
    run_dir, messages, _ = two_rounds
    assert messages[0] == f"run directory: {run_dir} (after a kill: fedllm resume {run_dir})"
    assert any(m.startswith("torch threads: ") for m in messages)
    rounds = [m for m in messages if m.startswith("round ")]
    assert [m.split(":")[0] for m in rounds] == ["round 1", "round 2"] and "eval loss" in rounds[1]


def test_rounds_count_from_one_like_the_checkpoints(two_rounds):
    run_dir = two_rounds[0]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ledger = {json.loads(line)["round"] for line in (run_dir / "ledger.jsonl").read_text().splitlines()}
    checkpoints = sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").iterdir())
    assert [r["round"] for r in rows] == [1, 2] and ledger == {1, 2} and checkpoints == [1, 2]


def test_the_summary_names_rounds_eval_change_bytes_and_the_next_commands(two_rounds):
    run_dir, _, out = two_rounds
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert out.startswith("done: 2 rounds in ") and f"run directory {run_dir}" in out
    assert f"eval loss {rows[0]['eval_loss']:.4f} (round 1) -> {rows[1]['eval_loss']:.4f} (round 2)" in out
    up = human_bytes(rows[0]["bytes_up"] + rows[1]["bytes_up"])
    assert f"bytes on the wire: {up} up" in out and f"final: {run_dir / 'final'} (a PEFT adapter)" in out
    assert f"fedllm export {run_dir} OUT --round N" in out and f"fedllm plot {run_dir}" in out


def test_a_run_stopped_before_its_planned_rounds_says_so(two_rounds):
    run_dir = two_rounds[0]
    text = (run_dir / "recipe.yaml").read_text().replace("rounds: 2", "rounds: 5")
    (run_dir / "recipe.yaml").write_text(text)
    assert run_summary(run_dir, 75).startswith("done: 2 rounds of 5 planned (stopped early: see the warning above) in 1m15s")


def test_a_single_evaluation_is_shown_once(two_rounds):
    run_dir = two_rounds[0]
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text(rows[0] + "\n")
    line = run_summary(run_dir, 1).splitlines()[1]
    assert line.startswith("  eval loss ") and "(round 1);" in line and "->" not in line


def test_plots_have_a_title_naming_the_adapter_and_strategy(two_rounds):
    run_dir = two_rounds[0]
    assert run_title(run_dir) == "run: lora + fedavg"
    assert main(["plot", str(run_dir)]) == 0
    assert all((run_dir / "plots" / f"{n}.png").stat().st_size > 5000 for n in ("loss", "eval", "bytes"))


def test_no_progress_bar_without_a_terminal(monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: False)
    assert show_progress(True) is False
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    assert show_progress(True) is True and show_progress(False) is False


def test_human_bytes():
    assert [human_bytes(n) for n in (512, 807_200, 3_400_000_000)] == ["512 B", "807.2 kB", "3.4 GB"]


def test_attaching_lora_raises_no_library_warning():
    model = load_model(ModelConfig(name="tiny-llama"), byte_tokenizer(), seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LoRA(r=2, target_modules=["q_proj"]).attach(model, seed=0)
    assert [str(w.message) for w in caught] == []

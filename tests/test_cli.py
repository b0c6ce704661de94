"""The command line: bad input gets a message naming the problem and the fix, exit code 2."""
import json

import pytest
import torch
import yaml

from fedllm.cli import main
from fedllm.engine import run_recipe
from fedllm.metrics import plot_run


def fails_with(argv, capsys, *fragments):
    assert main(argv) == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_a_mistyped_recipe_key_fails_before_any_work(recipe_file, capsys):
    fails_with(["run", str(recipe_file()), "federation.num_client=3"], capsys, "federation.num_client", "did you mean 'num_clients'")


def test_an_unknown_adapter_lists_the_known_ones(recipe_file, capsys):
    fails_with(["run", str(recipe_file(adapter={"name": "lorra"}))], capsys, "unknown adapter 'lorra'", "lora", "ffa_lora")


def test_a_dataset_without_the_needed_columns_names_them(recipe_file, tmp_path, capsys):
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}", "answer": "a"}) + "\n" for i in range(20)))
    err = fails_with(["run", str(recipe_file(data={"path": str(data), "format": "alpaca"}))], capsys, "instruction", "question")
    assert "data.format" in err


def test_a_missing_partition_column_names_the_columns_present(recipe_file, capsys):
    path = recipe_file(data={"partitioner": {"name": "dirichlet", "column": "topic"}})
    fails_with(["run", str(path)], capsys, "topic", "category")


def test_a_missing_recipe_file_is_reported(capsys, tmp_path):
    fails_with(["run", str(tmp_path / "nope.yaml")], capsys, "does not exist")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_4bit_without_cuda_says_so(recipe_file, capsys):
    fails_with(["run", str(recipe_file(model={"name": "some-org/some-model", "quantization": "4bit"}))], capsys, "CUDA", "quantization=none")


def test_export_of_a_missing_round_lists_the_available_ones(recipe_file, capsys, tmp_path):
    run_dir = run_recipe(str(recipe_file(federation={"rounds": 1})))
    fails_with(["export", str(run_dir), str(tmp_path / "out"), "--round", "7"], capsys, "round 7", "[1]")


def test_plot_writes_png_curves(recipe_file):
    run_dir = run_recipe(str(recipe_file(federation={"rounds": 2})))
    paths = plot_run(run_dir)
    assert {p.name for p in paths} == {"loss.png", "eval.png", "bytes.png"}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000 for p in paths)


def test_list_prints_plugins(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "ffa_lora" in out and "fedyogi" in out and "dirichlet" in out


def test_a_robust_rule_that_cannot_meet_n_vs_f_fails_before_training(recipe_file, capsys):
    path = recipe_file(strategy={"name": "krum", "f": 3}, federation={"num_clients": 6, "clients_per_round": 5})
    fails_with(["run", str(path)], capsys, "krum", "n ≥ 2f+3 = 9", "clients_per_round=5")


@pytest.mark.parametrize("argv", [["--debug", "run", "missing.yaml"], ["run", "missing.yaml", "--debug"]])
def test_debug_shows_the_traceback_and_plain_runs_do_not(argv, capsys):
    assert main(argv) == 2
    assert "Traceback" in capsys.readouterr().err
    assert main(["run", "missing.yaml"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1


@pytest.mark.parametrize("name", ["../elsewhere", "/tmp/abs", "a/b", ".."])
def test_output_name_cannot_leave_output_dir(recipe_file, capsys, name):
    fails_with(["run", str(recipe_file()), f"output.name={name}"], capsys, "output.name must be one plain directory name")


def test_a_full_disk_names_the_file_and_the_fix():
    import errno

    from fedllm.cli import describe

    text = describe(OSError(errno.ENOSPC, "No space left on device", "runs/x/checkpoints/.tmp_round_3/global.safetensors"))
    assert "no space left" in text and ".tmp_round_3/global.safetensors" in text and "fedllm resume" in text


@pytest.mark.parametrize("verb", [["resume"], ["export", "OUT"]])
def test_a_run_directorys_remote_code_needs_the_command_lines_consent(recipe_file, tmp_path, capsys, verb):
    run_dir = run_recipe(str(recipe_file(federation={"rounds": 1})))
    text = (run_dir / "recipe.yaml").read_text().replace("trust_remote_code: false", "trust_remote_code: true")
    (run_dir / "recipe.yaml").write_text(text)
    argv = [verb[0], str(run_dir)] + [str(tmp_path / "out")] * (len(verb) - 1)
    fails_with(argv, capsys, "model.trust_remote_code: true", "--trust-remote-code")

"""Every user mistake a newcomer hit (issue 15) ends in one line naming the problem and the
fix, exit code 2, no traceback, and before any model is trained."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedllm.cli import main
from fedllm.recipe import Recipe, dump_recipe

ROOT = Path(__file__).resolve().parents[1]


def one_line_error(argv, capsys, *fragments) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("fedllm: error: "), err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_broken_yaml_names_the_file_and_line(tmp_path, capsys):
    path = tmp_path / "mine.yaml"
    path.write_text("seed: 0\nmodel:\n  name: tiny-llama\n dtype: float32\n")
    err = one_line_error(["run", str(path)], capsys, f"{path}:4:2 is not valid YAML", "expected <block end>")
    assert "<unicode string>" not in err


def test_rank_zero_says_what_r_is(recipe_file, capsys):
    one_line_error(["run", str(recipe_file()), "adapter.r=0"], capsys, "adapter.r must be at least 1 (got 0)")


@pytest.mark.parametrize("adapter", ["lora", "ffa_lora", "wara"])
def test_target_modules_matching_nothing_lists_the_linear_layers(recipe_file, capsys, adapter):
    path = recipe_file(adapter={"name": adapter, "target_modules": ["attn"]})
    one_line_error(["run", str(path)], capsys, "adapter.target_modules=['attn'] matches no linear layer",
                   "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj")


def test_export_to_peft_of_a_full_parameter_run_names_what_it_can_export(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints" / "round_1").mkdir(parents=True)
    (run / "recipe.yaml").write_text(dump_recipe(Recipe(adapter={"name": "full"}).check_plugins()))
    one_line_error(["export", str(run), str(tmp_path / "out"), "--to", "peft"], capsys,
                   "adapter 'full' cannot be exported as peft: it exports merged (use --to merged)")


def test_an_output_dir_that_cannot_be_written_is_reported_before_the_model_loads(recipe_file, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    one_line_error(["run", str(recipe_file(output={"dir": str(tmp_path / "a_file" / "runs")}))], capsys,
                   "a_file/runs cannot be written (Not a directory): set output.dir to a directory you can write")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_a_read_only_output_dir_is_reported(recipe_file, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    one_line_error(["run", str(recipe_file(output={"dir": str(locked)}))], capsys, "cannot be written (Permission denied)")


@pytest.mark.parametrize("verb", [["resume"], ["export", "--to", "peft"]])
def test_resume_or_export_of_a_missing_path_says_no_such_directory(tmp_path, capsys, verb):
    one_line_error([verb[0], str(tmp_path / "runs" / "gone"), *([str(tmp_path / "out")] if verb[0] == "export" else []),
                    *verb[1:]], capsys, "no such directory:", "gone")


@pytest.mark.parametrize("name", ["tiny-lama", "Tiny-Llama", "my-org/my-model"])
def test_an_unknown_model_name_fails_at_once_offline(recipe_file, capsys, monkeypatch, name):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    one_line_error(["run", str(recipe_file(model={"name": name}))], capsys, f"model.name '{name}' is neither a preset",
                   "did you mean 'tiny-llama'?")


def test_a_misspelt_preset_fails_at_once_even_online(recipe_file, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda *a, **k: pytest.fail("went to the hub"))
    one_line_error(["run", str(recipe_file(model={"name": "tiny-gtp2"}))], capsys, "misspelt preset",
                   "did you mean 'tiny-gpt2'?")


@pytest.mark.slow
def test_the_trainer_example_runs_in_one_plain_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env = {k: v for k, v in env.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR")}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "hf_trainer_example.py"), "--max_steps", "4",
                           "--local_steps", "2", "--output_dir", str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "eval_loss" in done.stdout and (tmp_path / "out" / "final" / "adapter_config.json").exists()

"""The torch thread count is chosen, not torch's default of every core: the recipe/CLI number,
else OMP_NUM_THREADS, else this rank's share of the usable cores, at most one per 20M parameters."""
import logging

import pytest
import torch

import fedllm.threads as threads
from fedllm.threads import choose_threads, set_threads


@pytest.fixture
def eight_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 8)


def test_a_small_model_gets_one_thread_and_a_large_one_the_cores(eight_cores):
    assert choose_threads(None, 200_000)[0] == 1
    assert choose_threads(None, 70_000_000)[0] == 3
    assert choose_threads(None, 1_000_000_000)[0] == 8


def test_ranks_on_one_machine_share_its_cores(eight_cores, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert choose_threads(None, 1_000_000_000)[0] == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert choose_threads(None, 1_000_000_000)[0] == 1


def test_ranks_share_the_tokenizers_thread_pool_and_a_set_size_is_kept(eight_cores, monkeypatch):
    monkeypatch.delenv("RAYON_NUM_THREADS", raising=False)
    threads.share_tokenizer_threads()
    assert "RAYON_NUM_THREADS" not in threads.os.environ  # one rank: the tokenizer's own default
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    threads.share_tokenizer_threads()
    assert threads.os.environ["RAYON_NUM_THREADS"] == "2"
    monkeypatch.setenv("RAYON_NUM_THREADS", "3")
    threads.share_tokenizer_threads()
    assert threads.os.environ["RAYON_NUM_THREADS"] == "3"


def test_an_explicit_number_wins_over_the_environment_and_the_environment_over_the_choice(eight_cores, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert choose_threads(None, 1_000_000_000) == (3, "OMP_NUM_THREADS")
    assert choose_threads(5, 1_000) == (5, "client.threads / --threads")


def test_the_choice_is_applied_and_printed(eight_cores, caplog):
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO, logger="fedllm"):
            assert set_threads(None, torch.nn.Linear(64, 64)) == 1
        assert torch.get_num_threads() == 1
        assert "torch threads: 1 (8 usable core(s) / 1 rank(s) on this machine, 0.0M parameters" in caplog.text
    finally:
        torch.set_num_threads(before)


def test_threads_on_the_command_line_is_the_recipe_option(monkeypatch, tmp_path):
    import fedllm.engine as engine
    from fedllm.cli import main

    seen = {}
    monkeypatch.setattr(engine, "run_recipe", lambda path, overrides: seen.setdefault("overrides", overrides) and tmp_path)
    assert main(["run", "r.yaml", "--threads", "2", "federation.rounds=3"]) == 0
    assert seen["overrides"] == ["federation.rounds=3", "client.threads=2"]

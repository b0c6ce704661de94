"""`fedllm eval` on finished tiny runs: it reproduces the run's own numbers, tells the trained
model from the base, reports per-client spread that adds back up to the pooled metric, writes
generations, and leaves the run untouched."""
import hashlib
import json

import pytest

from fedllm.cli import main
from fedllm.metrics import read_jsonl

pytestmark = pytest.mark.slow


def evaluate(run_dir, *options):
    assert main(["eval", str(run_dir), "--no-progress", *options]) == 0
    root = run_dir.parent if (run_dir / "adapter_config.json").exists() else run_dir  # a run's final/ export
    return json.loads(max(root.glob("eval/*/results.json"), key=lambda p: p.stat().st_mtime_ns).read_text())


def digest(run_dir) -> dict:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file() and "eval" not in p.relative_to(run_dir).parts}


def test_eval_reproduces_the_final_eval_loss_the_base_differs_and_the_run_is_untouched(pooled_run, capsys):
    before = digest(pooled_run)
    logged = read_jsonl(pooled_run / "metrics.jsonl")[-1]
    trained = evaluate(pooled_run)
    assert trained["target"] == "round_2"
    got = trained["scores"]["heldout"]["metrics"]
    for key in ("eval_loss", "perplexity", "token_accuracy"):
        assert got[key] == pytest.approx(logged[key], abs=1e-6), key
    base = evaluate(pooled_run, "--base")["scores"]["heldout"]["metrics"]
    assert base["eval_loss"] > got["eval_loss"] + 0.3  # 2 rounds of training moved the model
    out = capsys.readouterr().out
    assert "run's logged eval_loss (same)" in out and "eval_loss" in out
    assert digest(pooled_run) == before


def test_round_picks_a_numbered_or_the_best_checkpoint(pooled_run):
    rows = read_jsonl(pooled_run / "metrics.jsonl")
    first = evaluate(pooled_run, "--round", "1")
    assert first["target"] == "round_1"
    assert first["scores"]["heldout"]["metrics"]["eval_loss"] == pytest.approx(rows[0]["eval_loss"], abs=1e-6)
    best = min(rows, key=lambda r: r["eval_loss"])["round"]
    assert evaluate(pooled_run, "--round", "best")["round"] == best


def test_an_exported_peft_directory_scores_as_its_round(pooled_run):
    logged = read_jsonl(pooled_run / "metrics.jsonl")[-1]
    got = evaluate(pooled_run / "final")
    assert got["target"] == "peft-final"
    assert got["scores"]["heldout"]["metrics"]["eval_loss"] == pytest.approx(logged["eval_loss"], abs=1e-5)


def test_per_client_metrics_weighted_by_tokens_sum_back_to_the_pooled_metric(per_client_run):
    row = read_jsonl(per_client_run / "metrics.jsonl")[-1]
    clients = row["eval_clients"]
    assert len(clients) == 4 and all(c["tokens"] > 0 for c in clients)
    tokens = sum(c["tokens"] for c in clients)
    assert sum(c["eval_loss"] * c["tokens"] for c in clients) / tokens == pytest.approx(row["eval_loss"], rel=1e-12)
    assert sum(c["token_accuracy"] * c["tokens"] for c in clients) / tokens == pytest.approx(row["token_accuracy"], rel=1e-12)
    losses = sorted(c["eval_loss"] for c in clients)
    assert row["eval_loss_client_worst"] == losses[-1]
    assert row["eval_loss_client_mean"] == pytest.approx(sum(losses) / 4)
    assert losses[-2] <= row["eval_loss_client_p10"] <= losses[-1]

    result = evaluate(per_client_run, "--compare-base")["scores"]["heldout"]
    assert result["metrics"]["eval_loss"] == pytest.approx(row["eval_loss"], abs=1e-6)
    report = result["per_client"]
    assert [c["tokens"] for c in report["clients"]] == [c["tokens"] for c in clients]
    assert report["pooled"]["eval_loss"] == pytest.approx(row["eval_loss"], abs=1e-6)
    assert result["base"]["per_client"]["spread"]["eval_loss"]["mean"] > report["spread"]["eval_loss"]["mean"] + 0.3


def test_the_per_client_split_is_recorded_and_disjoint_from_training(per_client_run):
    meta = json.loads((per_client_run / "run_meta.json").read_text())
    held_out = meta["client_eval_rows"]
    assert len(held_out) == 4
    rows = [i for shard in held_out for i in shard]
    assert len(rows) == len(set(rows)) == 48  # 20% of each client's share of the 240 rows
    assert 0 < meta["eval_examples"] <= 48  # (minus rows whose response max_length 96 cut away)
    assert sum(meta["client_sizes"]) <= 240 - 48


def test_personalised_scores_are_labelled_and_local_steps_lower_each_clients_own_loss(per_client_run, capsys):
    result = evaluate(per_client_run, "--personalize-steps", "3")["scores"]["heldout"]
    personal = result["personalized"]
    assert personal["steps"] == 3
    assert personal["spread"]["eval_loss"]["mean"] < result["per_client"]["spread"]["eval_loss"]["mean"]
    assert "after 3 local steps on its own shard" in capsys.readouterr().out
    # the global model is back in place: the held-out metric of a second call is unchanged
    again = evaluate(per_client_run)["scores"]["heldout"]["metrics"]["eval_loss"]
    assert again == pytest.approx(result["metrics"]["eval_loss"], abs=1e-12)


def test_generations_sit_beside_references_and_the_base(pooled_run):
    result = evaluate(pooled_run, "--generate", "3", "--compare-base", "--max-new-tokens", "8")
    assert result["generations"]["count"] == 3 and result["generations"]["greedy"]
    lines = [json.loads(line) for line in (pooled_run / "eval" / "round_2" / "generations.jsonl").read_text().splitlines()]
    assert len(lines) == 3
    for line in lines:
        assert line["prompt"].startswith("### Instruction:") and line["reference"]
        assert line["completion"] != line["base_completion"]

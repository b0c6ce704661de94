"""lm-evaluation-harness tasks on the in-memory model (the optional extra `fedllm[eval]`).

The model object itself is handed to lm-eval's HFLM (base + the run's adapter, no merge):
given an adapter directory instead, lm-eval would rebuild the model and resize its embedding
to the tokenizer. Tasks are any lm-eval knows, plus an offline group shipped with fedllm,
`fedllm_quickstart`, built from the bundled quickstart data: perplexity (rolling, of each
whole example), the loglikelihood of each response given its prompt (and whether it is the
greedy continuation), multiple choice (which category an instruction belongs to) and
generation (exact match of greedy answers)."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import yaml

from fedllm.data import load_rows, to_spans
from fedllm.evaluation.subject import EvalError

GROUP = "fedllm_quickstart"
BUNDLED = (GROUP, f"{GROUP}_ppl", f"{GROUP}_ll", f"{GROUP}_mc", f"{GROUP}_gen")
ITEMS_EVERY = 40  # every 40th bundled row: 50 items per task
_task_dir: Path | None = None


def _lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise EvalError("lm-evaluation-harness tasks need lm-eval, which is not installed: pip install 'fedllm[eval]' "
                        "(fedllm's own task, flowertune-general-nlp, needs nothing more)") from None
    return lm_eval


def quickstart_items() -> list[dict]:
    """The bundled task's items: the Dolly-format prompt, the response, and the category as a choice."""
    rows = load_rows("bundled:quickstart").to_list()[::ITEMS_EVERY]
    categories = sorted({r["category"] for r in load_rows("bundled:quickstart").to_list()})
    items = []
    for row in rows:
        (prompt, _), (response, _) = to_spans(row, "dolly", None)
        items.append({"prompt": prompt, "response": response, "instruction": row["instruction"],
                      "choices": categories, "label": categories.index(row["category"])})
    return items


def _task(name: str, data: Path, **config) -> dict:
    return {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", **config}


def bundled_task_dir() -> Path:
    """The bundled tasks as lm-eval YAML (written once per process: they name their data file by absolute path)."""
    global _task_dir
    if _task_dir is None:
        root = Path(tempfile.mkdtemp(prefix="fedllm-lm-eval-"))
        data = root / "quickstart_items.jsonl"
        data.write_text("".join(json.dumps(item) + "\n" for item in quickstart_items()))
        tasks = [
            _task(f"{GROUP}_ppl", data, output_type="loglikelihood_rolling", doc_to_text="",
                  doc_to_target="{{prompt}}{{response}}",
                  metric_list=[{"metric": m, "aggregation": a, "higher_is_better": False} for m, a in (
                      ("word_perplexity", "weighted_perplexity"), ("byte_perplexity", "weighted_perplexity"),
                      ("bits_per_byte", "bits_per_byte"))]),
            _task(f"{GROUP}_ll", data, output_type="loglikelihood", doc_to_text="{{prompt}}",
                  doc_to_target="{{response}}", target_delimiter="",
                  metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]),
            _task(f"{GROUP}_mc", data, output_type="multiple_choice",
                  doc_to_text="### Instruction:\n{{instruction}}\n\n### Category:\n", doc_to_choice="{{choices}}",
                  doc_to_target="{{label}}", target_delimiter="",
                  metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]),
            _task(f"{GROUP}_gen", data, output_type="generate_until", doc_to_text="{{prompt}}",
                  doc_to_target="{{response}}", target_delimiter="",
                  generation_kwargs={"until": ["\n\n", "</s>"], "max_gen_toks": 48, "do_sample": False},
                  metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                                "ignore_case": True, "ignore_punctuation": True}]),
        ]
        for task in tasks:
            (root / f"{task['task']}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
        (root / f"{GROUP}.yaml").write_text(yaml.safe_dump({"group": GROUP, "task": [t["task"] for t in tasks]}))
        _task_dir = root
    return _task_dir


def task_manager(names: list[str]):
    """lm-eval's task index: only the bundled tasks when only they are asked for (indexing every
    built-in task takes a while)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(bundled_task_dir()), include_defaults=not set(names) <= set(BUNDLED))


def task_names(names: list[str]) -> set[str]:
    """Every task and group name lm-eval knows (raises the install hint without lm-eval)."""
    _lm_eval()
    return set(task_manager(names).all_tasks)


def run(model, tokenizer, names: list[str], batch_size: int = 8, limit: int | None = None,
        log_samples: bool = False) -> dict:
    """{task: {"metrics": {metric: value}}} (and lm-eval's per-item `samples` with log_samples)."""
    lm_eval = _lm_eval()
    from lm_eval.models.huggingface import HFLM

    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(names), task_manager=task_manager(names), limit=limit,
                                  log_samples=log_samples)
    results = {}
    for task, values in out["results"].items():
        metrics = {k.replace(",none", ""): float(v) for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and "stderr" not in k and k != "sample_len"}
        if not metrics:
            continue  # a group: its tasks have their own entries
        entry = {"metrics": metrics, "items": values.get("sample_len")}
        results[task] = {**entry, **({"samples": out["samples"].get(task, [])} if log_samples else {})}
    return results

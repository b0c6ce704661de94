"""Benchmark tasks for `fedllm eval --tasks`: fedllm's own (FlowerTune's general-NLP MMLU
protocol) by name, every other name an lm-evaluation-harness task (the optional extra
`fedllm[eval]`), the bundled offline ones included. Unknown names fail before any model loads."""
from __future__ import annotations

from pathlib import Path

from fedllm.evaluation.subject import EvalError, Subject
from fedllm.registry import nearest


def _flowertune(subject: Subject, req, out_dir: Path) -> dict:
    from fedllm.evaluation.flowertune import run_general_nlp

    return run_general_nlp(subject.model, subject.tokenizer, req.task_data, batch_size=req.batch_size or 16,
                           limit=req.limit, progress=req.progress, out_dir=out_dir)


OWN = {"flowertune-general-nlp": _flowertune}


def check_tasks(names: list[str]) -> None:
    """Every name is fedllm's own task or one lm-evaluation-harness knows (if it is installed)."""
    others = [n for n in names if n not in OWN]
    if not others:
        return
    from fedllm.evaluation import harness

    known = harness.task_names(others)  # raises the install hint when lm-eval is missing
    for name in others:
        if name not in known:
            raise EvalError(f"unknown task '{name}'{nearest(name, list(OWN) + sorted(known))} fedllm's own: "
                            f"{', '.join(OWN)}; bundled lm-eval tasks: {', '.join(harness.BUNDLED)}")


def run_tasks(subject: Subject, req, out_dir: Path) -> dict:
    results = {name: OWN[name](subject, req, out_dir) for name in req.tasks if name in OWN}
    others = [n for n in req.tasks if n not in OWN]
    if others:
        from fedllm.evaluation import harness

        results.update(harness.run(subject.model, subject.tokenizer, others, batch_size=req.batch_size or 8, limit=req.limit))
    return results

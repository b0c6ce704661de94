"""`fedllm eval`: scores a run's checkpoint, its base, or an exported PEFT directory on the
run's held-out split (per client where the run holds out per client), on another dataset,
and on benchmark tasks; optionally writes generations. Everything goes to
eval/<target>/ (results.json, generations.jsonl); the run itself is only read."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedllm.distributed import Reducer
from fedllm.evaluation import evaluate
from fedllm.evaluation.eval_data import external, heldout
from fedllm.evaluation.generate import complete, prompt_and_reference
from fedllm.evaluation.per_client import example_sums, metrics, per_client_report, score_clients
from fedllm.evaluation.subject import EvalError, Subject, load, locate
from fedllm.metrics import write_atomically
from fedllm.rundir import refuse_planted_links

HELDOUT = "heldout"


@dataclass
class EvalRequest:
    """One `fedllm eval` invocation (the command line's options, by name)."""

    path: str
    round: str = "last"
    base: bool = False
    recipe: str | None = None  # for a PEFT directory outside a run
    data: str | None = None
    format: str | None = None
    split: str = "train"
    subset: str | None = None
    max_samples: int | None = None
    tasks: list[str] = field(default_factory=list)
    task_data: str | None = None
    limit: int | None = None  # items per task
    generate: int = 0
    compare_base: bool = False
    sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    max_new_tokens: int = 64
    batch_size: int | None = None
    personalize_steps: int = 0
    trust_remote_code: bool = False
    progress: bool = True


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def score_heldout(subject: Subject, data, which: str = "target") -> dict:
    """The run's held-out split with the run's own code path, batch size and eval.max_batches
    (so the numbers equal the logged ones), per client where the run holds out per client.
    `which`: the target's weights or the base's."""
    subject.use(which)
    cfg, pad = subject.recipe.eval, subject.tokenizer.pad_token_id
    reducer = Reducer(next(subject.model.parameters()).device)
    size = cfg.per_device_eval_batch_size
    cap = cfg.max_batches * size if cfg.max_batches else None
    out = {"examples": len(data.eval)}
    if data.client_eval is not None:  # as evaluate_per_client, which logged the run's numbers
        report = per_client_report(score_clients(subject.model, data.client_eval, size, pad, reducer, cap))
        out["metrics"] = {k: v for k, v in report["pooled"].items() if k != "tokens"}
        out["per_client"] = report
    elif subject.adapter is not None:
        out["metrics"] = evaluate(subject.model, subject.adapter, subject.states[which], data.eval, cfg, pad, reducer)
    else:  # a PEFT directory: the model already holds its weights
        out["metrics"] = metrics(example_sums(subject.model, data.eval[:cap], size, pad, reducer.device).sum(0))
    logged = subject.logged()
    if which == "target" and logged.get("eval_loss") is not None:
        out["run_logged"] = {k: logged[k] for k in ("eval_loss", "perplexity", "token_accuracy") if k in logged}
    return out


def score_examples(subject: Subject, examples: list[dict], batch_size: int) -> dict:
    sums = example_sums(subject.model, examples, batch_size, subject.tokenizer.pad_token_id, next(subject.model.parameters()).device)
    return {"examples": len(examples), "metrics": metrics(sums.sum(0))}


def write_generations(subject: Subject, examples: list[dict], req: EvalRequest, out_dir: Path, batch_size: int) -> dict:
    """generations.jsonl: prompt, reference, completion (and the base's, with --compare-base)."""
    chosen = examples[: req.generate]
    pairs = [prompt_and_reference(e) for e in chosen]
    prompts = [p for p, _ in pairs]
    options = dict(max_new_tokens=req.max_new_tokens, batch_size=batch_size, sample=req.sample,
                   temperature=req.temperature, top_p=req.top_p, seed=req.seed, progress=req.progress)
    completions = complete(subject.model, subject.tokenizer, prompts, desc=f"generating ({subject.label})", **options)
    base = None
    if req.compare_base and subject.label != "base":
        subject.use("base")
        base = complete(subject.model, subject.tokenizer, prompts, desc="generating (base)", **options)
        subject.use("target")
    decode = lambda ids: subject.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    lines = []
    for i, ((prompt, reference), completion) in enumerate(zip(pairs, completions)):
        line = {"index": i, "prompt": decode(prompt), "reference": decode(reference), "completion": completion}
        if base is not None:
            line["base_completion"] = base[i]
        lines.append(json.dumps(line))
    write_atomically(out_dir / "generations.jsonl", "".join(line + "\n" for line in lines))
    mode = {"sampled": True, "seed": req.seed, "temperature": req.temperature, "top_p": req.top_p} if req.sample else {"greedy": True}
    return {"file": "generations.jsonl", "count": len(lines), "max_new_tokens": req.max_new_tokens, **mode}


def _merge(path: Path, new: dict) -> dict:
    """results.json keeps what earlier evaluations of the same target wrote (other datasets, tasks)."""
    old = json.loads(path.read_text()) if path.is_file() else {}
    merged = {**old, **{k: v for k, v in new.items() if k not in ("scores", "tasks")}}
    for key in ("scores", "tasks"):
        merged[key] = {**old.get(key, {}), **new.get(key, {})}
    return merged


def _scores(subject: Subject, req: EvalRequest, batch_size: int) -> tuple[dict, list[dict]]:
    """{dataset: scores} for --data or the run's held-out split (none: a run without held-out rows
    asked only for tasks), and the examples scored (the prompts of --generate)."""
    recipe = subject.recipe
    if req.data is not None:
        examples = external(req.data, recipe, subject.tokenizer, req.format, req.split, req.subset, req.max_samples)
        if not examples:
            raise EvalError(f"--data {req.data}: no row has anything left to score after truncation to data.max_length")
        score = score_examples(subject, examples, batch_size)
        if req.compare_base and subject.label != "base":  # the same examples, with the base's weights
            subject.use("base")
            score["base"] = score_examples(subject, examples, batch_size)
            subject.use("target")
        return {f"data:{req.data}": score}, examples
    data = heldout(recipe, subject.tokenizer, subject.run_dir)
    if not data.eval:
        if req.tasks and not req.generate:
            return {}, []
        raise EvalError("the run holds out no examples (data.eval_fraction=0 and no data.eval_path): "
                        "pass --data PATH to score a dataset, or --tasks")
    score = score_heldout(subject, data)
    if req.compare_base and subject.label != "base":
        score["base"] = score_heldout(subject, data, "base")
        subject.use("target")
    if req.personalize_steps:
        from fedllm.evaluation.personalize import personalized_report

        score["personalized"] = personalized_report(subject.model, subject.adapter, recipe, data, subject.state,
                                                    req.personalize_steps, subject.tokenizer.pad_token_id, batch_size)
    return {HELDOUT: score}, data.eval


def eval_run(req: EvalRequest) -> tuple[dict, Path]:
    """Runs the evaluation `req` asks for; returns the results and the results.json path."""
    from fedllm.evaluation.tasks import check_tasks, run_tasks

    check_tasks(req.tasks)  # before any model is built
    subject = locate(req.path, req.round, req.base, req.recipe, req.trust_remote_code)
    if req.personalize_steps and (subject.run_dir is None or req.data or not subject.recipe.eval.per_client):
        raise EvalError("--personalize-steps trains each client on its own shard and scores it on its own held-out "
                        "slice: it needs a run directory whose recipe has eval.per_client: true (and no --data)")
    refuse_planted_links(subject.out_dir)  # eval/ is written below it: never through a planted link
    load(subject, _device())
    batch_size = req.batch_size or subject.recipe.eval.per_device_eval_batch_size
    out_dir = subject.out_dir / "eval" / subject.label
    scores, examples = _scores(subject, req, batch_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {
        "target": subject.label, "round": subject.round, "path": str(Path(req.path)),
        "fedllm_version": __import__("fedllm").__version__, "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "scores": scores, "tasks": run_tasks(subject, req, out_dir) if req.tasks else {},
    }
    if req.generate:
        results["generations"] = write_generations(subject, examples, req, out_dir, batch_size)
    path = out_dir / "results.json"
    merged = _merge(path, results)
    write_atomically(path, json.dumps(merged, indent=1))
    return merged, path

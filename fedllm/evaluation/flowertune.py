"""FlowerTune's general-NLP evaluation (`fedllm eval --tasks flowertune-general-nlp`): MMLU's
test questions of three categories (STEM, social sciences, humanities), each asked in
FlowerTune's prompt, answered by greedy generation of as many tokens as the gold letter
takes, and scored by FlowerTune's answer extraction; the accuracy per category is over all
its questions. As in flowertune-llm/evaluation/general-nlp (benchmarks.py, utils.py) of
adap/flower; the data is MMLU's test split, from --task-data or the hub."""
from __future__ import annotations

import json
import re
from pathlib import Path

from fedllm.data import load_rows
from fedllm.evaluation.generate import complete
from fedllm.evaluation.subject import EvalError
from fedllm.metrics import write_atomically

CATEGORIES = {
    "stem": ["abstract_algebra", "anatomy", "astronomy", "college_biology", "college_chemistry",
             "college_computer_science", "college_mathematics", "college_physics", "computer_security",
             "conceptual_physics", "electrical_engineering", "elementary_mathematics", "high_school_biology",
             "high_school_chemistry", "high_school_computer_science", "high_school_mathematics",
             "high_school_physics", "high_school_statistics", "machine_learning"],
    "social_sciences": ["econometrics", "high_school_geography", "high_school_government_and_politics",
                        "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology",
                        "human_sexuality", "professional_psychology", "public_relations", "security_studies",
                        "sociology", "us_foreign_policy"],
    "humanities": ["formal_logic", "high_school_european_history", "high_school_us_history",
                   "high_school_world_history", "international_law", "jurisprudence", "logical_fallacies",
                   "moral_disputes", "moral_scenarios", "philosophy", "prehistory", "professional_law",
                   "world_religions"],
}
INSTRUCTION = "Answer the following multiple choice question."
HUB_DATASET = "cais/mmlu"  # FlowerTune reads lukaemon/mmlu, a loading script datasets no longer runs; same questions
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def prompt(question: str, options: list[str]) -> str:
    """FlowerTune's question text inside its chat-style wrapper."""
    if not question.endswith(("?", ".")):
        question += "?"
    listed = "\n".join(f"{chr(65 + i)}. {option}" for i, option in enumerate(options))
    body = f"{INSTRUCTION}\nQuestion: {question}\n\nOptions:\n{listed}\nThe answer is:\n"
    return f"<|im_start|>question\n{body}<|im_end|>\n<|im_start|>answer\n"


def extract_answer(output: str, gold: str) -> tuple[str, str]:
    """(prediction, gold), lower-cased, by FlowerTune's rule for multiple choice: the line after a
    "\\n##" if there is one, letters and digits only, its first character if that is a choice
    letter (or yes/no); otherwise the whole output stands as the prediction (and is wrong)."""
    output, gold = output.lower(), gold.lower()
    whole = output
    if "\n##" in output:
        output = output.split("\n##")[1].split("\n")[0].strip()
    output = re.sub(" +", " ", re.sub(r"[^a-zA-Z0-9]", " ", output).strip())
    output = output.encode("ascii", "ignore").decode("ascii")[:1]
    return (output, gold) if output in ("a", "b", "c", "d", "e", "yes", "no") else (whole, gold)


def _questions(rows, subject: str) -> list[dict]:
    """Rows in lukaemon/mmlu's columns (input, A-D, target) or cais/mmlu's (question, choices, answer)."""
    columns = set(rows.column_names)
    if {"input", "A", "B", "C", "D", "target"} <= columns:
        return [{"question": r["input"], "options": [r["A"], r["B"], r["C"], r["D"]], "gold": r["target"],
                 "subject": subject} for r in rows.to_list()]
    if {"question", "choices", "answer"} <= columns:
        return [{"question": r["question"], "options": list(r["choices"]), "gold": "ABCD"[int(r["answer"])],
                 "subject": subject} for r in rows.to_list()]
    raise EvalError(f"MMLU subject {subject} has columns {', '.join(sorted(columns))}; flowertune-general-nlp needs "
                    "input, A, B, C, D, target (lukaemon/mmlu) or question, choices, answer (cais/mmlu)")


def load_subject(task_data: str | None, subject: str) -> list[dict] | None:
    """A subject's test questions: <task_data>/<subject>.jsonl|json|csv|parquet, else the hub; None if absent."""
    if task_data is not None:
        found = [Path(task_data) / f"{subject}{s}" for s in SUFFIXES if (Path(task_data) / f"{subject}{s}").is_file()]
        return _questions(load_rows(str(found[0])), subject) if found else None
    try:
        return _questions(load_rows(HUB_DATASET, subject, "test"), subject)
    except (OSError, ConnectionError, ValueError) as err:
        raise EvalError(f"flowertune-general-nlp needs MMLU's test split: could not load {HUB_DATASET} ({type(err).__name__}); "
                        "pass --task-data DIR holding <subject>.jsonl/.csv files") from None


def _answers(model, tokenizer, questions: list[dict], batch_size: int, progress: bool) -> list[str]:
    """Greedy answers, batch by batch; each batch generates as many tokens as its first gold letter takes."""
    out = []
    for start in range(0, len(questions), batch_size):
        batch = questions[start : start + batch_size]
        length = len(tokenizer(batch[0]["gold"], add_special_tokens=False)["input_ids"])
        ids = [tokenizer(prompt(q["question"], q["options"]))["input_ids"] for q in batch]
        out += complete(model, tokenizer, ids, max_new_tokens=length, batch_size=len(batch), progress=False)
    return out


def run_general_nlp(model, tokenizer, task_data: str | None, batch_size: int = 16, limit: int | None = None,
                    progress: bool = True, out_dir: Path | None = None) -> dict:
    """Accuracy per category (and their mean) over the subjects present; the answers go to
    out_dir/flowertune_general_nlp.jsonl."""
    if task_data is not None and not Path(task_data).is_dir():
        raise EvalError(f"--task-data {task_data} is not a directory (expected <subject>.jsonl/.csv files of MMLU)")
    metrics, counts, missing, lines = {}, {}, [], []
    for category, subjects in CATEGORIES.items():
        questions = []
        for subject in subjects:
            found = load_subject(task_data, subject)
            if found is None:
                missing.append(subject)
            else:
                questions += found[:limit] if limit else found
        if not questions:
            continue
        answers = _answers(model, tokenizer, questions, batch_size, progress)
        scored = [extract_answer(a, q["gold"]) for a, q in zip(answers, questions)]
        metrics[category] = sum(p == g for p, g in scored) / len(scored)
        counts[category] = len(scored)
        lines += [json.dumps({"category": category, "subject": q["subject"], "gold": q["gold"], "output": a,
                              "prediction": p}) for q, a, (p, _) in zip(questions, answers, scored)]
    if not metrics:
        raise EvalError(f"no MMLU subject of flowertune-general-nlp found in {task_data}: expected files named "
                        "<subject>.jsonl/.csv, e.g. abstract_algebra.jsonl")
    metrics["average"] = sum(metrics.values()) / len(metrics)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_atomically(out_dir / "flowertune_general_nlp.jsonl", "".join(line + "\n" for line in lines))
    return {"metrics": metrics, "questions": counts, "subjects_missing": missing}

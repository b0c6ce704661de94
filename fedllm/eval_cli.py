"""The command line of evaluation: `fedllm eval`, `fedllm compare` and the several-run form
of `fedllm plot`. Parsers only here (the CLI starts fast); the work is in fedllm.evaluation."""
from __future__ import annotations

import argparse

COMMANDS = ("eval", "compare", "plot")


def add_parsers(sub) -> None:
    ev = sub.add_parser("eval", help="score a run's checkpoint (or its base, or a PEFT export) on held-out data or tasks")
    ev.add_argument("run_dir", help="a run directory, or an exported PEFT directory (with --recipe outside a run)")
    what = ev.add_mutually_exclusive_group()
    what.add_argument("--round", default="last", help="round number, 'last' or 'best' (lowest logged eval loss)")
    what.add_argument("--base", action="store_true", help="score the untouched base model (the run's round-0 state)")
    ev.add_argument("--recipe", help="the recipe of a PEFT directory that lies outside any run directory")
    ev.add_argument("--data", help="score this dataset (bundled:<name>, a local file or folder, or a hub name) "
                    "instead of the run's held-out split")
    ev.add_argument("--format", choices=["alpaca", "dolly", "chat", "text"], help="--data's format (default: the run's)")
    ev.add_argument("--split", default="train", help="--data's split")
    ev.add_argument("--subset", help="--data's configuration name (hub datasets)")
    ev.add_argument("--max-samples", type=int, help="score only the first N rows of --data")
    ev.add_argument("--tasks", default="", help="comma-separated benchmark tasks: flowertune-general-nlp, or "
                    "lm-evaluation-harness tasks (pip install 'fedllm[eval]'; offline: fedllm_quickstart)")
    ev.add_argument("--task-data", help="a folder holding a task's data (flowertune-general-nlp: <subject>.jsonl/csv files)")
    ev.add_argument("--limit", type=int, help="score at most N items per task")
    ev.add_argument("--generate", type=int, default=0, metavar="N", help="write N completions of held-out prompts")
    ev.add_argument("--compare-base", action="store_true", help="score (and generate with) the base model beside it")
    ev.add_argument("--sample", action="store_true", help="sample (seeded) instead of greedy decoding")
    ev.add_argument("--temperature", type=float, default=1.0)
    ev.add_argument("--top-p", type=float, default=1.0)
    ev.add_argument("--seed", type=int, default=0, help="the sampling seed")
    ev.add_argument("--max-new-tokens", type=int, default=64)
    ev.add_argument("--batch-size", type=int, help="default: the run's eval.per_device_eval_batch_size")
    ev.add_argument("--personalize-steps", type=int, default=0, metavar="K",
                    help="also score each client after K local steps on its own shard (needs eval.per_client)")
    ev.add_argument("--trust-remote-code", action="store_true", help="allow the run's model.trust_remote_code: true")
    ev.add_argument("--no-progress", action="store_true", help="no progress bars")
    compare = sub.add_parser("compare", help="a side-by-side table of runs (their logs and fedllm eval results)")
    compare.add_argument("run_dirs", nargs="+")
    plot = sub.add_parser("plot", help="PNG curves of one run; with several, one figure overlaying them")
    plot.add_argument("run_dirs", nargs="+")
    plot.add_argument("--out", help="the overlay's PNG (default: compare.png beside the first run)")


def main(args: argparse.Namespace) -> int:
    if args.command == "eval":
        from fedllm.evaluation.report import table
        from fedllm.evaluation.run_eval import EvalRequest, eval_run

        request = EvalRequest(
            path=args.run_dir, round=args.round, base=args.base, recipe=args.recipe, data=args.data, format=args.format,
            split=args.split, subset=args.subset, max_samples=args.max_samples,
            tasks=[t.strip() for t in args.tasks.split(",") if t.strip()], task_data=args.task_data, limit=args.limit,
            generate=args.generate, compare_base=args.compare_base, sample=args.sample, temperature=args.temperature,
            top_p=args.top_p, seed=args.seed, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
            personalize_steps=args.personalize_steps, trust_remote_code=args.trust_remote_code,
            progress=not args.no_progress,
        )
        results, path = eval_run(request)
        print(table(results))
        print(f"written: {path}")
        return 0
    from fedllm.evaluation import compare

    if args.command == "compare":
        print(compare.compare_table(args.run_dirs))
    else:
        for path in compare.plot(args.run_dirs, args.out):
            print(path)
    return 0

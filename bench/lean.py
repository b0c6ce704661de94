"""Lean processes (issue 18), measured in one run on the side-by-side workload: tiny-llama,
LoRA r=16 on every linear layer, bundled quickstart data, 20 clients, 10 per round, 5 local
steps of batch 4, every process on one torch thread.

(a) peak RSS of `fedllm run` / a bare loop doing the same rounds (transformers + peft +
    torch only: no fedllm import, FedAvg by hand). Goal <= 1.05.
(b) 2 ranks (gloo; launched by torchrun, and forked by `fedllm run --processes 2`) over 1 rank,
    next to this machine's own two-core ceiling for float work: wall time of the rounds and of the whole job, and
    each rank's time split (imports / model / data / train / collectives / eval /
    checkpoint / rest), timed by wrapping the engine's functions in the worker (no engine
    change), in wall and in CPU seconds, and each thread's CPU seconds (oversubscription
    shows there). Goal >= 1.67 on 2 cores. Runs alternate 1-rank / 2-rank; each neighbouring
    pair's ratios (wall, and CPU of the busier rank, which the load disturbs less) are printed
    with the load average before and after each run: on a shared machine it decides the numbers.
(c) data memory / token bytes: the resident memory `prepare_data` keeps for N rows (default
    40,000: the quickstart rows repeated, from a local jsonl), measured on a second
    preparation in the same fresh process (what the first one pays once per process --
    Arrow's and the tokenizer's pools and caches, first-use imports -- is reported apart),
    over tokens x bytes per token id. Goal <= 1.2.
DP-SGD per-example gradients, loop vs vmap, are timed by bench/dp_sgd_vmap.py (--dp runs it).

    python bench/lean.py [--quick] [--rounds 3] [--reps 2] [--rows 40000] [--dp] [--speed-only] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLIENTS, PER_ROUND, STEPS, BATCH, MAX_LENGTH = 20, 10, 5, 4, 224


def recipe(out: Path, name: str, rounds: int) -> dict:
    return {
        "seed": 0, "model": {"name": "tiny-llama"},
        "data": {"path": "bundled:quickstart", "format": "dolly", "max_length": MAX_LENGTH, "eval_fraction": 0.1,
                 "partitioner": {"name": "iid"}},
        "adapter": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "strategy": {"name": "fedavg"},
        "federation": {"rounds": rounds, "num_clients": CLIENTS, "clients_per_round": PER_ROUND},
        "client": {"max_steps": STEPS, "per_device_train_batch_size": BATCH, "learning_rate": 0.005, "threads": 1},
        "eval": {"every": 0, "max_batches": 2, "per_device_eval_batch_size": 32},
        "output": {"dir": str(out), "name": name, "progress": False, "checkpoint_every": 0},
    }


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run_child(cmd: list[str]) -> tuple[dict, float]:
    """(the JSON its last stdout line printed, wall seconds)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=ROOT)
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    for line in reversed(out.splitlines()):  # two ranks' lines may interleave: the last whole one
        try:
            value = json.loads(line) if line.startswith("{") else None
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value, wall
    return {}, wall


# ---- (a) the bare loop: what a user would write with transformers + peft alone ---------
def bare(spec: dict) -> dict:
    import json as _json

    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.set_num_threads(1)
    torch.manual_seed(0)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # fedllm's byte tokenizer, rebuilt
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False))
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    rows = [_json.loads(line) for line in (ROOT / "fedllm/data/bundled/quickstart.jsonl").read_text().splitlines()]
    examples = []
    for r in rows:
        prompt = f"### Instruction:\n{r['instruction']}\n\n" + (f"### Context:\n{r['context']}\n\n" if r["context"] else "") + "### Response:\n"
        p, a = tokenizer(prompt)["input_ids"], tokenizer(r["response"])["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor((p + a)[:MAX_LENGTH])
        examples.append((ids, torch.cat([torch.full((len(p),), -100), torch.tensor(a)])[:MAX_LENGTH]))
    rng = np.random.default_rng(0)
    order = rng.permutation(len(examples))
    held_out, train = [examples[i] for i in order[: len(order) // 10]], [examples[i] for i in order[len(order) // 10 :]]
    shards = np.array_split(np.arange(len(train)), CLIENTS)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    global_state = {n: p.detach().clone() for n, p in params.items()}

    def batch(items):
        width = max(len(i) for i, _ in items)
        ids = torch.full((len(items), width), tokenizer.pad_token_id)
        labels, mask = torch.full((len(items), width), -100), torch.zeros((len(items), width), dtype=torch.long)
        for row, (i, lab) in enumerate(items):
            ids[row, : len(i)], labels[row, : len(i)], mask[row, : len(i)] = i, lab, 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    for _ in range(spec["rounds"]):
        total = {n: torch.zeros_like(t) for n, t in global_state.items()}
        for cid in rng.choice(CLIENTS, PER_ROUND, replace=False):
            for n, p in params.items():
                p.data.copy_(global_state[n])
            optimizer = torch.optim.AdamW(params.values(), lr=0.005)
            for _ in range(STEPS):
                picked = rng.choice(shards[cid], BATCH, replace=False)
                model(**batch([train[i] for i in picked])).loss.backward()
                torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            for n, p in params.items():
                total[n] += p.detach() / PER_ROUND
        global_state = total
    with torch.no_grad():
        for start in range(0, 64, 32):
            model(**batch(held_out[start : start + 32]))
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / "final")
    return {"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


# ---- (b) a rank of `fedllm run`, its time split -------------------------------------------
class Split:
    """Exclusive wall and CPU time (this process, every thread) per named part: time inside a
    nested part counts for it only."""

    def __init__(self):
        self.spent, self.cpu, self.stack = {}, {}, []

    def wrap(self, owner, attribute: str, part: str) -> None:
        inner = getattr(owner, attribute)

        def timed(*args, **kwargs):
            self.stack.append([time.perf_counter(), time.process_time(), 0.0, 0.0])
            try:
                return inner(*args, **kwargs)
            finally:
                start, cpu_start, nested, nested_cpu = self.stack.pop()
                elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
                self.spent[part] = self.spent.get(part, 0.0) + elapsed - nested
                self.cpu[part] = self.cpu.get(part, 0.0) + cpu - nested_cpu
                if self.stack:
                    self.stack[-1][2] += elapsed
                    self.stack[-1][3] += cpu

        setattr(owner, attribute, timed)


def thread_cpu() -> dict[str, float]:
    """CPU seconds per thread name of this process (Linux /proc), summed over same-named threads."""
    tick, out = os.sysconf("SC_CLK_TCK"), {}
    for stat in Path("/proc/self/task").glob("*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the thread ended meanwhile
            continue
        name, fields = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return out


def worker(spec: dict) -> dict:
    begin, cpu_begin = time.perf_counter(), time.process_time()
    import torch

    import fedllm.distributed as dist_mod
    from fedllm import client, engine

    imported, imported_cpu = time.perf_counter() - begin, time.process_time() - cpu_begin
    if spec.get("forked"):  # `fedllm run --processes N`: the ranks fork from here, after the imports
        from fedllm.launcher import fork_ranks

        code = fork_ranks(spec["forked"], lambda: measure_rank(spec, imported, imported_cpu, engine, client, dist_mod) and 0)
        if code:
            raise SystemExit(code)
        return {}
    return measure_rank(spec, imported, imported_cpu, engine, client, dist_mod)


def measure_rank(spec: dict, imported: float, imported_cpu: float, engine, client, dist_mod) -> dict:
    import torch

    split = Split()
    import fedllm.base_layout as layout
    import fedllm.fleet as fleet

    split.wrap(layout, "build_model", "model")
    split.wrap(fleet, "prepare_data_once", "data")
    split.wrap(client.Client, "run", "train")
    for name in ("all_reduce_sum_", "all_gather_rows", "broadcast_int", "broadcast_state_", "barrier"):
        split.wrap(dist_mod, name, "collectives")
        if hasattr(engine, name):
            setattr(engine, name, getattr(dist_mod, name))
    split.wrap(engine.Federation, "evaluate", "eval")
    split.wrap(engine.Federation, "checkpoint", "checkpoint")
    split.wrap(engine.Federation, "export_final", "checkpoint")
    rounds_time = Split()  # the rounds alone, inclusive: what the speed-up of the rounds compares
    rounds_time.wrap(engine.Federation, "run_round", "rounds")
    started, cpu_started = time.perf_counter(), time.process_time()
    run_dir = engine.run_recipe(spec["recipe"], [])
    total, total_cpu = time.perf_counter() - started, time.process_time() - cpu_started
    rank = int(os.environ.get("RANK", "0"))
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    parts, cpu = {"imports": imported, **split.spent}, {"imports": imported_cpu, **split.cpu}
    parts["rest"], cpu["rest"] = total - sum(split.spent.values()), total_cpu - sum(split.cpu.values())
    out = {"rank": rank, "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
           "parts": parts, "cpu": cpu, "total": imported + total, "total_cpu": imported_cpu + total_cpu,
           "round_seconds": sum(r.get("seconds", 0.0) for r in rounds), "round_cpu": rounds_time.cpu.get("rounds", 0.0),
           "thread_cpu": thread_cpu(), "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "RAYON_NUM_THREADS",
                                                                              "LOCAL_WORLD_SIZE")},
           "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    Path(f"{spec['report']}.rank{rank}.json").write_text(json.dumps(out))
    return out


def job(tmp: Path, ranks: int, rounds: int, label: str, forked: bool = False) -> dict:
    """One run: 1 rank, or `ranks` ranks launched by torchrun or forked (fedllm run --processes)."""
    name = f"{label}_{ranks}r{'_forked' if forked else ''}"
    shutil.rmtree(tmp / name, ignore_errors=True)
    recipe_path = tmp / f"{name}.json"
    recipe_path.write_text(json.dumps(recipe(tmp, name, rounds)))
    spec = json.dumps({"recipe": str(recipe_path), "report": str(tmp / f"{name}.timing"), "forked": ranks if forked else 0})
    me = [str(Path(__file__).resolve()), "--worker", spec]
    cmd = [sys.executable, *me] if ranks == 1 or forked else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_addr=127.0.0.1",
        f"--master_port={29500 + os.getpid() % 1000}", *me]
    load = os.getloadavg()[0]
    _, wall = run_child(cmd)
    per_rank = [json.loads((tmp / f"{name}.timing.rank{r}.json").read_text()) for r in range(ranks)]
    return {"ranks": ranks, "wall": wall, "load_before": load, "load_after": os.getloadavg()[0], "per_rank": per_rank,
            "round_seconds": max(r["round_seconds"] for r in per_rank), "round_cpu": max(r["round_cpu"] for r in per_rank),
            "cpu": max(r["total_cpu"] for r in per_rank), "label": label, "forked": forked}


# ---- the machine's own ceiling for two busy cores ----------------------------------------
KERNEL = ("import time, torch; torch.set_num_threads(1); a = torch.rand(256, 256); t = time.perf_counter()\n"
          "for _ in range(4000): a @ a\nprint(time.perf_counter() - t)")


def two_core_ceiling() -> dict:
    """Float work (one-thread 256x256 matmuls, what a local step is made of) run alone, then twice
    at once: 2 x alone / together is the most two ranks of any program can gain on these two
    cores (below 2 where the cores share execution units or clock budget, e.g. SMT siblings)."""
    def timed(n: int) -> list[float]:
        procs = [subprocess.Popen([sys.executable, "-c", KERNEL], stdout=subprocess.PIPE, text=True, env=env()) for _ in range(n)]
        return [float(p.communicate()[0]) for p in procs]

    alone, together = min(timed(1)[0] for _ in range(2)), min(max(timed(2)) for _ in range(2))
    return {"alone": alone, "together": together, "ceiling": 2 * alone / together}


# ---- (c) data memory ---------------------------------------------------------------------
def data_memory(spec: dict) -> dict:
    import gc

    import datasets

    from fedllm.data import prepare_data
    from fedllm.models import byte_tokenizer
    from fedllm.recipe import DataConfig

    def rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    tmp = Path(spec["tmp"])
    datasets.config.HF_DATASETS_CACHE = str(tmp / "hf-cache")
    rows = [json.loads(line) for line in (ROOT / "fedllm/data/bundled/quickstart.jsonl").read_text().splitlines()]
    path = tmp / "rows.jsonl"
    with path.open("w") as f:  # distinct rows: the instruction carries the copy's number
        for k in range(spec["rows"]):
            row = rows[k % len(rows)]
            f.write(json.dumps({**row, "instruction": f"{row['instruction']} ({k // len(rows)})"}) + "\n")
    tokenizer = byte_tokenizer()
    cfg = DataConfig(path=str(path), format="dolly", max_length=MAX_LENGTH, eval_fraction=0.01)
    first_before = rss()
    first = prepare_data(cfg, tokenizer, CLIENTS, 0)
    first_held = rss() - first_before
    gc.collect()
    before = rss()  # a second preparation: what the data holds, without what the first paid once per process
    data = prepare_data(cfg, tokenizer, CLIENTS, 0)
    held = rss() - before
    del first
    splits = [*data.clients, data.eval]
    tokens = sum(s.num_tokens for s in splits)
    id_bytes = tokens * data.eval.ids.itemsize
    return {"rows": spec["rows"], "tokens": tokens, "id_dtype": str(data.eval.ids.dtype), "held": held,
            "once_per_process": first_held - held, "token_bytes": id_bytes, "packed_bytes": sum(s.nbytes for s in splits),
            "ratio": held / id_bytes, "list_bytes": tokens * 2 * 36}


# ---- report ------------------------------------------------------------------------------
def verdict(value: float, goal: float, at_least: bool = False) -> str:
    ok = value >= goal if at_least else value <= goal
    return f"{value:.3f}  (goal {'>=' if at_least else '<='} {goal}: {'PASS' if ok else 'FAIL'})"


def report(res: dict) -> str:
    mib = 2**20
    a, b, c = res.get("memory"), res["ranks"], res.get("data")
    lines = [f"load average at start {res['load_start']:.1f} on {os.cpu_count()} cores, at end {os.getloadavg()[0]:.1f}"]
    if a is not None:
        lines.append(f"(a) peak RSS, {res['rounds']} rounds: fedllm run {a['fedllm'] / mib:.1f} MiB, bare loop "
                     f"{a['bare'] / mib:.1f} MiB   ratio {verdict(a['fedllm'] / a['bare'], 1.05)}")
    ones = [r for r in b if r["ranks"] == 1]
    best = lambda runs, key: min(r[key] for r in runs)  # noqa: E731  the least disturbed run of each
    lines.append(f"(b) 2 ranks over 1 rank, {len(ones)} alternating runs each (best of each; every run below):")
    if "ceiling" in res:
        k = res["ceiling"]
        lines.append(f"    this machine's two-core ceiling for float work: one-thread matmuls alone {k['alone']:.2f} s, two at "
                     f"once {k['together']:.2f} s each: at most {k['ceiling']:.2f}x for any 2 ranks here")
    for launch, forked in (("torchrun", False), ("forked (fedllm run --processes 2)", True)):
        twos = [r for r in b if r["ranks"] == 2 and r.get("forked", False) == forked]
        if not twos:
            continue
        lines += [f"  {launch}:",
                  f"    rounds only  {best(ones, 'round_seconds'):.1f} s / {best(twos, 'round_seconds'):.1f} s = "
                  f"{verdict(best(ones, 'round_seconds') / best(twos, 'round_seconds'), 1.67, at_least=True)}",
                  f"    whole job    {best(ones, 'wall'):.1f} s / {best(twos, 'wall'):.1f} s = "
                  f"{verdict(best(ones, 'wall') / best(twos, 'wall'), 1.67, at_least=True)}"]
        lines.append("    pair by pair (load average before/after each run; CPU: the busier rank's CPU seconds, load-independent):")
        for label in sorted({r["label"] for r in b if r["label"].startswith("speed")}):
            one = next(r for r in b if r["label"] == label and r["ranks"] == 1)
            two = next(r for r in twos if r["label"] == label)
            lines.append(f"    {label}: 1 rank at load {one['load_before']:.1f}/{one['load_after']:.1f}, 2 ranks at "
                         f"{two['load_before']:.1f}/{two['load_after']:.1f}: rounds {one['round_seconds'] / two['round_seconds']:.2f}x, "
                         f"whole job {one['wall'] / two['wall']:.2f}x; CPU: rounds {one['round_cpu'] / two['round_cpu']:.2f}x, "
                         f"whole job {one['cpu'] / two['cpu']:.2f}x")
    names = ["imports", "model", "data", "train", "collectives", "eval", "checkpoint", "rest"]
    lines.append(f"    {'run':<18}{'load':>5}{'wall':>7}" + "".join(f"{n:>12}" for n in names) + "   rounds  threads")
    for i, run in enumerate(b):
        for r in run["per_rank"]:
            ranks = f"{run['ranks']}{'f' if run.get('forked') else ''}"
            for kind, key, rounds in (("wall", "parts", r["round_seconds"]), ("cpu", "cpu", r["round_cpu"])):
                lines.append(f"    #{i} rank {r['rank']}/{ranks:<2}{kind:<5}{run['load_before']:>5.1f}"
                             f"{(run['wall'] if kind == 'wall' else r['total_cpu']):>7.1f}"
                             + "".join(f"{r[key].get(n, 0.0):>12.2f}" for n in names) + f"{rounds:>9.2f}"
                             + (f"  {r['threads']}+{r['interop_threads']}" if kind == "wall" else ""))
            busy = sorted(((t, c) for t, c in r["thread_cpu"].items() if c >= 0.05), key=lambda x: -x[1])
            if not busy:
                continue
            lines.append(f"        CPU s by thread: " + ", ".join(f"{t} {c:.2f}" for t, c in busy) + f"  ({r['env']})")
    if c is None:
        return "\n".join(lines)
    lines += [f"(c) data: {c['rows']} rows, {c['tokens']} tokens as {c['id_dtype']}: held {c['held'] / mib:.1f} MiB "
              f"(packed buffers {c['packed_bytes'] / mib:.1f} MiB; as two Python lists they took ~{c['list_bytes'] / mib:.0f} MiB); "
              f"paid once per process {c['once_per_process'] / mib:.1f} MiB",
              f"    held / token bytes ({c['token_bytes'] / mib:.1f} MiB) = {verdict(c['ratio'], 1.2)}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 rounds, 1 rep, 10,000 rows")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--reps", type=int, default=None, help="alternating 1-rank / 2-rank pairs")
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--dp", action="store_true", help="also run bench/dp_sgd_vmap.py")
    parser.add_argument("--speed-only", action="store_true", help="(b) alone: no bare loop, no data memory")
    parser.add_argument("--out", type=Path)
    for hidden in ("--worker", "--bare", "--data"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    for flag, fn in ((args.worker, worker), (args.bare, bare), (args.data, data_memory)):
        if flag:
            print(json.dumps(fn(json.loads(flag))))
            return
    rounds = args.rounds or (2 if args.quick else 3)
    reps = args.reps or (1 if args.quick else 2)
    rows = args.rows or (10_000 if args.quick else 40_000)
    res = {"rounds": rounds, "load_start": os.getloadavg()[0], "command": " ".join(sys.argv)}
    with tempfile.TemporaryDirectory(prefix="fedllm-lean-") as tmp:
        tmp = Path(tmp)
        # (a): each side in a fresh process that reports its own peak
        res["ranks"] = []
        if not args.speed_only:
            bare_out, _ = run_child([sys.executable, __file__, "--bare", json.dumps({"rounds": rounds, "out": str(tmp / "bare")})])
            one = job(tmp, 1, rounds, "memory")
            res["memory"] = {"bare": bare_out["peak_rss"], "fedllm": one["per_rank"][0]["peak_rss"]}
            res["ranks"] = [one]
        res["ceiling"] = two_core_ceiling()
        for i in range(reps):  # alternating, so that a change of load hits each kind of launch alike
            order = [(2, False), (1, False), (2, True)] if i % 2 == 0 else [(2, True), (1, False), (2, False)]
            res["ranks"] += [job(tmp, ranks, rounds, f"speed{i}", forked) for ranks, forked in order]
        if not args.speed_only:
            res["data"], _ = run_child([sys.executable, __file__, "--data", json.dumps({"tmp": str(tmp), "rows": rows})])
    print(report(res))
    if args.dp:
        subprocess.run([sys.executable, str(ROOT / "bench" / "dp_sgd_vmap.py")], env=env(), check=True)
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

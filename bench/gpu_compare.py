"""fedllm's local training vs a bare peft + accelerate loop doing the same steps, one check
at a time, in tokens/s (bench/gpu_check.sh runs every check on a GPU machine).

Both sides load the same saved base (a Llama built from a config, byte tokenizer), start
every client from the same adapter state x^t, and take the same batches (fedllm's data
split, `micro_batches` and `collate` with the same per-client seeds): a fresh AdamW per
client, forward, backward, clipping, step. Before timing, the first round's per-client
losses of both sides must agree: the check that they do the same work. fedllm is timed
as `Federation.run_round` (everything a round does besides evaluation and checkpoints),
the bare loop as its local steps only; rounds alternate, the median of `--reps` counts.

    python bench/gpu_compare.py CHECK [--device cuda|cpu] [--size tiny|small|medium] [--reps 3]
        CHECK: fp32 | bf16 | 4bit | 8bit | device_map | dp_sgd
    python bench/gpu_compare.py recipe --out FILE --dir DIR [--size small]   (for launched runs)
    python bench/gpu_compare.py run --check NAME --run-dir DIR [--device cuda]
        a launched run's last round (metrics.jsonl seconds) against the bare loop on one device
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from fedllm.data import collate
from fedllm.engine import Federation
from fedllm.models import byte_tokenizer
from fedllm.recipe import load_recipe, recipe_from_dict
from fedllm.training import client_seed, micro_batches, round_learning_rate

GOAL = 1.10  # fedllm's round time / the bare loop's, for the same tokens
SIZES = {  # hidden, intermediate, layers, heads
    "tiny": (64, 176, 2, 4), "small": (512, 1408, 8, 8), "medium": (1024, 2816, 16, 16),
}
CHECKS = {
    "fp32": {},
    "bf16": {"model": {"dtype": "bfloat16"}, "client": {"bf16": True}},
    "4bit": {"model": {"quantization": "4bit", "dtype": "bfloat16"}, "client": {"bf16": True}},
    "8bit": {"model": {"quantization": "8bit", "dtype": "bfloat16"}, "client": {"bf16": True}},
    "device_map": {},  # the map depends on the devices: see placement()
    # noise so small the losses stay comparable; the cost of drawing it is the same
    "dp_sgd": {"strategy": {"name": "dp_sgd", "inner": {"name": "fedavg"}, "max_grad_norm": 1.0},
               "privacy": {"noise_multiplier": 1e-6, "noise_seed": 0}},
}
TOLERANCE = {"fp32": 1e-4, "device_map": 1e-4, "dp_sgd": 1e-3}  # relative; 2e-2 for bf16 / k-bit


def save_base(folder: Path, size: str) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads = SIZES[size]
    tok = byte_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False, initializer_range=0.1))
    path = folder / f"llama-{size}"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def base_recipe(base: Path, out: Path, clients: int, steps: int, batch: int, **sections) -> dict:
    recipe = {
        "seed": 0,
        "model": {"name": str(base)},
        "data": {"path": "bundled:quickstart", "max_length": 256, "eval_fraction": 0.05},
        "adapter": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "strategy": {"name": "fedavg"},
        "federation": {"rounds": 2, "num_clients": clients, "clients_per_round": clients},
        "client": {"max_steps": steps, "per_device_train_batch_size": batch, "learning_rate": 1e-3},
        "eval": {"every": 1000, "max_batches": 1},
        "output": {"dir": str(out.parent), "name": out.name, "progress": False, "checkpoint_every": 0},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value}
    return recipe


def placement(device: str, base: Path) -> tuple[dict, str]:
    """device_map options for fedllm, and what the bare loop does instead."""
    weights = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    if device == "cuda" and torch.cuda.device_count() >= 2:
        return {"device_map": "balanced"}, "the same balanced map"
    half = f"{max(1, weights * 6 // 10 // 1024)}KB"  # accelerate keeps room for one offloaded layer besides
    if device == "cuda":  # one GPU: about half the layers offloaded to CPU RAM
        return {"device_map": "auto", "max_memory": {0: half, "cpu": "64GiB"}}, "unsplit on the GPU (offload has no goal)"
    return {"device_map": "auto", "max_memory": {"cpu": half, "disk": "64GiB"}}, "unsplit (offload has no goal)"


# ---- the bare loop -----------------------------------------------------------------------
def bare_model(recipe, device: str, device_map=None):
    """The same base and LoRA straight through transformers, peft and accelerate."""
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    m, a = recipe.model, recipe.adapter
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[m.dtype]
    quant = None
    if m.quantization == "4bit":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
    elif m.quantization == "8bit":
        quant = BitsAndBytesConfig(load_in_8bit=True)
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision="bf16" if recipe.client.bf16 else "no")
    place = device_map or ({"": accelerator.device} if quant else None)
    model = AutoModelForCausalLM.from_pretrained(m.name, dtype=dtype, quantization_config=quant, device_map=place)
    if quant:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=a["r"], lora_alpha=a["alpha"], lora_dropout=a["dropout"],
                                             target_modules=a["target_modules"], task_type="CAUSAL_LM"))
    if place is None:
        model.to(accelerator.device)
    return model, accelerator


def dp_sgd_grads(model, params: dict, inputs: dict, clip: float, sigma: float) -> torch.Tensor:
    """Per-example gradients by torch.func, clipped to `clip`, summed, noised, averaged into
    `.grad`; returns the mean of the per-example losses."""
    from torch.func import functional_call, grad_and_value, vmap

    batch = {k: v for k, v in inputs.items() if k != "attention_mask"}  # right padding: unchanged losses

    def loss_one(weights, example):
        return functional_call(model, weights, args=(), kwargs={k: v.unsqueeze(0) for k, v in example.items()}).loss

    weights = {k: p.detach() for k, p in params.items()}
    grads, losses = vmap(grad_and_value(loss_one), in_dims=(None, 0), randomness="different")(weights, batch)
    norms = torch.sqrt(sum(g.float().flatten(1).pow(2).sum(1) for g in grads.values()))
    scale = (clip / (norms + 1e-6)).clamp(max=1.0)
    size = next(iter(batch.values())).shape[0]
    for k, p in params.items():
        noisy = torch.einsum("b,b...->...", scale, grads[k].float()) + sigma * clip * torch.randn_like(p, dtype=torch.float32)
        p.grad = (noisy / size).to(p.dtype)
    return losses.detach().mean()


def bare_adamw(params: list, lr: float, cfg) -> torch.optim.Optimizer:
    """AdamW with the kernel fedllm's client picks: fused where `client.fused_optimizer` asks
    and torch has one for the device and dtype."""
    if getattr(cfg, "fused_optimizer", False):
        try:
            return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, fused=True)
        except (RuntimeError, ValueError):
            pass
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)


def bare_round(model, accelerator, fed, t: int, clients: list[int], x_t: dict, dp: dict | None) -> tuple[list[float], int]:
    """Each client's K local steps from x_t; per-client mean losses and real tokens trained on."""
    cfg, device = fed.recipe.client, accelerator.device
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    lr = round_learning_rate(cfg, t, fed.recipe.federation.rounds)
    model.train()
    losses, tokens = [], 0
    for cid in clients:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(x_t[name])
        seed = client_seed(fed.recipe.seed, t, cid)
        torch.manual_seed(seed)
        optimizer = bare_adamw(list(params.values()), lr, cfg)
        mine = []
        for batch in micro_batches(fed.data.clients[cid], cfg.per_device_train_batch_size, cfg.max_steps,
                                   np.random.default_rng(seed)):
            inputs = {k: v.to(device) for k, v in collate(batch, fed.pad_token_id).items()}
            tokens += int(inputs["attention_mask"].sum())
            if dp:
                with accelerator.autocast():
                    mine.append(dp_sgd_grads(model, params, inputs, dp["clip"], dp["sigma"]))
            else:
                with accelerator.autocast():
                    loss = model(**inputs).loss
                accelerator.backward(loss)
                mine.append(loss.detach())
                torch.nn.utils.clip_grad_norm_(params.values(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(torch.stack(mine).float().mean().item())
    return losses, tokens


# ---- side by side ------------------------------------------------------------------------
def synced(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def compare(check: str, args) -> bool:
    tmp = Path(tempfile.mkdtemp(prefix="fedllm-gpu-"))
    base = save_base(tmp, args.size)
    extra, bare_map, bare_note = dict(CHECKS[check]), None, ""
    if check == "device_map":
        options, bare_note = placement(args.device, base)
        extra["model"] = {**options, "offload_folder": str(tmp / "offload")}
        bare_map = "balanced" if options["device_map"] == "balanced" else None
    fed = Federation(recipe_from_dict(base_recipe(base, tmp / "run", args.clients, args.steps, args.batch, **extra)),
                     tmp / "run")
    fed.start()
    model, accelerator = bare_model(fed.recipe, args.device, bare_map)
    dp = {"clip": 1.0, "sigma": 1e-6} if check == "dp_sgd" else None
    clients = fed.participation.sampled(0)
    x_t = {k: v.clone() for k, v in fed.global_state.items()}
    ours = {s.client: s.train_loss for s in fed.run_round(0).stats}
    theirs, tokens = bare_round(model, accelerator, fed, 0, clients, x_t, dp)
    tolerance = TOLERANCE.get(check, 2e-2)
    same = all(abs(ours[c] - b) <= tolerance * max(1.0, abs(b)) for c, b in zip(clients, theirs))
    fed_times, bare_times = [], []
    for i in range(args.reps):  # alternate, swapping who goes first
        pair = [(fed_times, lambda: fed.run_round(0)),
                (bare_times, lambda: bare_round(model, accelerator, fed, 0, clients, x_t, dp))]
        for times, fn in pair if i % 2 == 0 else pair[::-1]:
            times.append(synced(fn)[1])
    ratio = statistics.median(fed_times) / statistics.median(bare_times)
    timed = check != "device_map" or bare_map is not None
    ok = same and (ratio <= GOAL or not timed)
    goal = f"goal <= {GOAL:.2f}" if timed else bare_note
    print(f"{check:<11} {'PASS' if ok else 'FAIL'}  fedllm {tokens / statistics.median(fed_times):>10,.0f} tok/s   "
          f"bare {tokens / statistics.median(bare_times):>10,.0f} tok/s   ratio {ratio:.3f} ({goal})   "
          f"losses {'agree' if same else 'DIFFER'} ({ours[clients[0]]:.4f} vs {theirs[0]:.4f})", flush=True)
    return ok


def compare_run(args) -> bool:
    """A launched run: its last round's seconds against the bare loop on one device."""
    run_dir = Path(args.run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "seconds" in r]
    final = run_dir / "final" / "adapter_model.safetensors"
    if not rows or not final.exists():
        print(f"{args.check:<11} FAIL  the run left no round timing or final adapter in {run_dir}")
        return False
    from safetensors.torch import load_file

    finite = all(torch.isfinite(t).all() for t in load_file(final).values())
    recipe = load_recipe(run_dir / "recipe.yaml", ["output.checkpoint_every=0"])
    fed = Federation(recipe, Path(tempfile.mkdtemp(prefix="fedllm-gpu-bare-")))
    group = getattr(recipe.federation, "group_size", 1) or 1
    if group > 1:  # a group of G ranks trains a client as one rank with G times the batch
        recipe.client.per_device_train_batch_size *= group
    model, accelerator = bare_model(recipe, args.device)
    t = recipe.federation.rounds - 1
    clients = fed.participation.sampled(t)
    bare_round(model, accelerator, fed, t, clients, fed.global_state, None)  # warm-up
    (_, tokens), bare_s = synced(lambda: bare_round(model, accelerator, fed, t, clients, fed.global_state, None))
    ours = rows[-1]["seconds"]
    print(f"{args.check:<11} {'PASS' if finite else 'FAIL'}  fedllm {tokens / ours:>10,.0f} tok/s   "
          f"bare {tokens / bare_s:>10,.0f} tok/s   speed-up {bare_s / ours:.2f}x over one device (bare loop)   "
          f"final adapter {'finite' if finite else 'NOT FINITE'}", flush=True)
    return finite


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("check", choices=[*CHECKS, "recipe", "run"])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=list(SIZES), default=None, help="default: small on cuda, tiny on cpu")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", help="recipe: where to write the recipe")
    parser.add_argument("--dir", help="recipe: where to save the base model")
    parser.add_argument("--run-dir", help="run: a finished run directory")
    args = parser.parse_args()
    args.size = args.size or ("small" if args.device == "cuda" else "tiny")
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"{args.check:<11} SKIP  no CUDA")
        return 0
    if args.check == "recipe":
        base = save_base(Path(args.dir), args.size)
        Path(args.out).write_text(yaml.safe_dump(base_recipe(base, Path(args.dir) / "runs" / "run", args.clients,
                                                             args.steps, args.batch)))
        return 0
    return 0 if (compare_run(args) if args.check == "run" else compare(args.check, args)) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Runs a whole federation: one resident model, simulated clients, optional distribution
over accelerate / torch.distributed ranks, atomic checkpoints and exact resume."""
from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fedllm.client import num_micro_batches
from fedllm.data import prepare_data
from fedllm.distributed import barrier, broadcast_int, broadcast_state_, is_distributed, process_state
from fedllm.metrics import MetricsLog, truncate_jsonl
from fedllm.models import check_quantization, load_model, load_tokenizer
from fedllm.recipe import Recipe, dump_recipe, load_recipe
from fedllm.registry import ADAPTERS, ATTACKS, CODECS, SAMPLERS, STRATEGIES
from fedllm.server import evaluate, run_round
from fedllm.state import ClientStore, checkpoint_dirs, read_checkpoint, write_checkpoint
from fedllm.strategies.base import RunInfo
from fedllm.wire import WireContext, serialized_size

log = logging.getLogger("fedllm")


def flat_config(tree: dict, prefix: str = "") -> dict:
    """{"client": {"learning_rate": ..}} -> {"client.learning_rate": ..}, scalars only (trackers' hparams)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    return flat


def new_run_dir(recipe: Recipe, recipe_name: str, device) -> Path:
    if recipe.output.name:
        return Path(recipe.output.dir) / recipe.output.name
    # every rank must pick the same name: rank 0's clock decides
    stamp = broadcast_int(int(time.time()), device)
    when = datetime.fromtimestamp(stamp, timezone.utc).strftime("%Y-%m-%dT%H-%M-%S")
    return Path(recipe.output.dir) / f"{recipe_name}-{when}"


def build_model(recipe: Recipe, device=None):
    """Tokenizer, base model and attached adapter: a pure function of the recipe."""
    check_quantization(recipe.model)
    tokenizer = load_tokenizer(recipe.model)
    base = load_model(recipe.model, tokenizer, recipe.seed, device)
    if recipe.client.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    adapter = ADAPTERS.build(recipe.adapter, "adapter")
    model = adapter.attach(base, recipe.seed)
    if device is not None:
        model.to(device)
    return tokenizer, model, adapter


class Federation:
    def __init__(self, recipe: Recipe, run_dir: Path):
        self.recipe, self.run_dir = recipe, Path(run_dir)
        self.state = process_state()
        self.device, self.rank, self.world_size = self.state.device, self.state.process_index, self.state.num_processes
        self.is_main = self.state.is_main_process
        self.tokenizer, self.model, self.adapter = build_model(recipe, self.device)
        self.pad_token_id = self.tokenizer.pad_token_id
        self.params = self.adapter.trainable(self.model)
        self.data = prepare_data(recipe.data, self.tokenizer, recipe.federation.num_clients, recipe.seed)
        self.strategy = STRATEGIES.build(recipe.strategy, "strategy")
        self.sampler = SAMPLERS.build(recipe.federation.sampler, "federation.sampler")
        self.codecs = [CODECS.build(c, f"codecs[{i}]") for i, c in enumerate(recipe.codecs)]
        self.strategy.setup(self.run_info())  # before init: e.g. a noise level chosen for the planned rounds
        self.attack = ATTACKS.build(recipe.byzantine, "byzantine") if recipe.byzantine else None
        self.byzantine = self.attack.choose(recipe.federation.num_clients, recipe.seed) if self.attack else set()
        for client_id in sorted(self.byzantine):
            self.data.clients[client_id] = self.attack.poison_data(self.data.clients[client_id], recipe.seed + client_id)
        self.global_state = self.adapter.state(self.model)  # the one extra copy of the trainable tensors
        # every rank starts from rank 0's server state (e.g. a secret DP noise generator)
        self.server_state = broadcast_state_(self.strategy.init(self.global_state), self.device)
        # Aggregation in the adapter's coordinate space (Ferret with a plain-mean strategy):
        # no full-size update per client, and the download is the rounds' compact aggregates.
        probe = self.adapter.coordinate_sum(WireContext(0, -1, recipe.seed))
        self.compact = self.strategy.plain_mean and self.attack is None and probe is not None
        self.broadcast_sizes: list[int] = []  # serialized size of each round's compact aggregate
        self._sampled: list[set[int]] = []  # the sampler's draws, replayed to know who missed what
        self._full_state_bytes: int | None = None
        # Ranks share per-client state through the run directory (budget 0: the disk is the store).
        budget = 0 if is_distributed() else int(recipe.federation.client_store_budget_mb * 2**20)
        self.store = ClientStore(self.run_dir / "client_store", budget)
        self.start_round = 0
        self.accelerator = self._trackers()
        self.metrics = MetricsLog(self.run_dir, self.is_main, self.accelerator)

    def _trackers(self):
        if not self.recipe.output.report_to:
            return None
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=self.device.type == "cpu", log_with=self.recipe.output.report_to, project_dir=str(self.run_dir))
        accelerator.init_trackers(self.run_dir.name, config=flat_config(self.recipe.model_dump(mode="json")))
        return accelerator

    def run_info(self) -> RunInfo:
        r = self.recipe
        sizes = list(self.data.client_sizes)
        return RunInfo(
            rounds=r.federation.rounds, num_clients=r.federation.num_clients,
            clients_per_round=r.federation.sampled_per_round(), sampler=r.federation.sampler["name"],
            client_sizes=sizes,
            local_steps=[num_micro_batches(r.client, n) // r.client.gradient_accumulation_steps for n in sizes],
            batch_size=r.client.per_device_train_batch_size * r.client.gradient_accumulation_steps, seed=r.seed,
            privacy=r.privacy.model_dump() if r.privacy else None,
        )

    def last_round_taken(self, client_id: int, before: int) -> int:
        """The last round < `before` in which the client was sampled (0 if none: it holds x^0)."""
        r = self.recipe.federation
        while len(self._sampled) < before:
            self._sampled.append(set(self.sampler.sample(len(self._sampled), r.num_clients, r.sampled_per_round(), self.recipe.seed)))
        return next((s for s in range(before - 1, -1, -1) if client_id in self._sampled[s]), 0)

    def full_state_bytes(self) -> int:
        if self._full_state_bytes is None:
            self._full_state_bytes = serialized_size(self.adapter.encode_global(self.global_state))
        return self._full_state_bytes

    # ---- life cycle -------------------------------------------------------------------
    def start(self) -> None:
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "recipe.yaml").write_text(dump_recipe(self.recipe))
            (self.run_dir / "run_meta.json").write_text(json.dumps(self.run_meta(), indent=1))
        barrier()

    def run_meta(self) -> dict:
        return {
            "fedllm_version": __import__("fedllm").__version__,
            "torch_version": torch.__version__,
            "world_size": self.world_size,
            "device_type": self.device.type,
            "trainable_parameters": sum(p.numel() for p in self.params.values()),
            "client_sizes": self.data.client_sizes,
            "eval_examples": len(self.data.eval),
            "adapter": self.adapter.metadata(self.model),
            "byzantine_clients": sorted(self.byzantine),
        }

    def resume(self) -> None:
        done = checkpoint_dirs(self.run_dir)
        if not done:
            log.info("no checkpoint in %s: starting from round 0", self.run_dir)
            return
        parts, meta = read_checkpoint(done[-1])
        self.global_state = {k: t.to(self.global_state[k].dtype) for k, t in parts["global"].items()}
        self.server_state = parts.get("server_state", {})
        self.broadcast_sizes = parts.get("engine", {}).get("broadcast_sizes", torch.zeros(0, dtype=torch.int64)).tolist()
        torch.set_rng_state(parts["rng"]["torch"])
        self.start_round = meta["round"]
        if self.is_main:
            self.store.restore(done[-1] / "clients")
            for name in ("metrics.jsonl", "ledger.jsonl"):
                truncate_jsonl(self.run_dir / name, self.start_round)
        barrier()
        log.info("resumed %s after round %d", self.run_dir, self.start_round)

    def checkpoint(self, rounds_done: int) -> None:
        if self.is_main:
            parts = {
                "global": self.global_state, "server_state": self.server_state, "rng": {"torch": torch.get_rng_state()},
                "engine": {"broadcast_sizes": torch.tensor(self.broadcast_sizes, dtype=torch.int64)},
            }
            meta = {"round": rounds_done, "saved_at": time.time()}
            write_checkpoint(self.run_dir, rounds_done, parts, self.store, meta, self.recipe.output.keep_last)
        barrier()

    def run(self) -> list[dict]:
        r = self.recipe
        rows = []
        rounds = range(self.start_round, r.federation.rounds)
        bar = tqdm(rounds, desc="rounds", disable=not (self.is_main and r.output.progress), dynamic_ncols=True)
        for t in bar:
            reason = self.strategy.stop_reason(t, self.server_state)
            if reason:
                log.warning("stopping before round %d: %s", t + 1, reason)
                if t > self.start_round and not (r.output.checkpoint_every and t % r.output.checkpoint_every == 0):
                    self.checkpoint(t)  # the last completed round must be on disk
                break
            mine = -(-r.federation.sampled_per_round() // self.world_size)
            steps = r.client.max_steps * mine if r.client.max_steps else None
            with tqdm(total=steps, desc=f"round {t + 1} local steps", leave=False, dynamic_ncols=True,
                      disable=not (self.is_main and r.output.progress)) as steps_bar:
                result = run_round(self, t, steps_bar)
            self.global_state, self.server_state = result.global_state, result.server_state
            last = t + 1 == r.federation.rounds
            extra = {"seconds": result.seconds, **self.strategy.metrics(self.server_state)}
            for codec in self.codecs:
                if hasattr(codec, "accounting"):  # e.g. RQM's ε after t + 1 rounds
                    extra.update(codec.accounting(t + 1))
            if self.data.eval and ((r.eval.every and (t + 1) % r.eval.every == 0) or last):
                extra.update(evaluate(self, self.data.eval))
            row = self.metrics.log_round(t, result.stats, extra)
            rows.append(row)
            bar.set_postfix({k: f"{row[k]:.4f}" for k in ("train_loss", "eval_loss") if row.get(k) is not None})
            if last or (r.output.checkpoint_every and (t + 1) % r.output.checkpoint_every == 0):
                self.checkpoint(t + 1)
        self.export_final()
        if self.accelerator is not None:
            self.accelerator.end_training()
        return rows

    def export_final(self) -> None:
        if self.is_main:
            export_adapter(self, self.run_dir / "final")
        barrier()


def export_adapter(fed, out: Path) -> None:
    # the adapter's preferred format: a PEFT adapter where the update is one, else merged weights
    write_export(fed.adapter, fed.model, fed.tokenizer, fed.global_state, out, fed.adapter.export_formats[0])


def write_export(adapter, model, tokenizer, global_state, out: Path, fmt: str = "peft") -> None:
    adapter.load(model, {k: t.to(next(model.parameters()).device) for k, t in global_state.items()})
    adapter.export(model, str(out), fmt)
    tokenizer.save_pretrained(str(out))


def export_run(run_dir: str, out: str, round: str = "last", fmt: str | None = None) -> Path:
    """Writes the global adapter of a checkpointed round (`peft`) or the merged model (`merged`)."""
    run_dir = Path(run_dir)
    done = {int(p.name.split("_")[1]): p for p in checkpoint_dirs(run_dir)}
    if not done:
        raise FileNotFoundError(f"{run_dir} has no checkpoint to export")
    wanted = max(done) if round == "last" else int(round)
    if wanted not in done:
        raise FileNotFoundError(f"no checkpoint of round {wanted} in {run_dir}; available: {sorted(done)}")
    recipe = load_recipe(run_dir / "recipe.yaml")
    tokenizer, model, adapter = build_model(recipe)
    parts, _ = read_checkpoint(done[wanted])
    write_export(adapter, model, tokenizer, parts["global"], Path(out), fmt or adapter.export_formats[0])
    return Path(out)


def run_recipe(path: str, overrides: list[str] = ()) -> Path:
    recipe = load_recipe(path, overrides)
    run_dir = new_run_dir(recipe, Path(path).stem, process_state().device)
    fed = Federation(recipe, run_dir)
    fed.start()
    fed.run()
    return run_dir


def resume_run(run_dir: str, overrides: list[str] = ()) -> Path:
    run_dir = Path(run_dir)
    if not (run_dir / "recipe.yaml").exists():
        raise FileNotFoundError(f"{run_dir} is not a fedllm run directory (no recipe.yaml)")
    fed = Federation(load_recipe(run_dir / "recipe.yaml", overrides), run_dir)
    fed.resume()
    fed.run()
    return run_dir

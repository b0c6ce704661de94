"""Runs a whole federation: one resident model, simulated clients, optional distribution
over accelerate / torch.distributed ranks, atomic checkpoints and exact resume. One round
(`Federation.run_round`) is sample → down → clients → up → collect → aggregate."""
from __future__ import annotations

import errno
import json
import logging
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from fedllm.asynchrony import AsyncRounds, SyncClock
from fedllm.base_layout import base_layout, build_for_group, resident_bytes, zero_whole_base
from fedllm.capabilities import check_pairings, local_loop
from fedllm.channel import Channel
from fedllm.client import Client
from fedllm.devices import Devices
from fedllm.distributed import Reducer, barrier, broadcast_int, broadcast_state_, client_groups, is_distributed, process_state
from fedllm.evaluation import evaluate
from fedllm.evaluation.per_client import evaluate_per_client
from fedllm.export import write_export
from fedllm.fleet import Fleet, LocalFleet
from fedllm.metrics import MetricsLog, check_writable, show_progress, truncate_jsonl, write_atomically
from fedllm.recipe import Recipe, check_resume_overrides, dump_recipe, load_recipe, refuse_remote_code
from fedllm.registry import ATTACKS, CODECS, SAMPLERS, STRATEGIES, RecipeError
from fedllm.rundir import refuse_planted_links
from fedllm.samplers import Participation
from fedllm.seeds import derive
from fedllm.server import RoundResult, Server
from fedllm.state import ClientStore, DAMAGE, checkpoint_dirs, read_checkpoint, read_manifest, verify_checkpoint, write_checkpoint
from fedllm.strategies.base import RunInfo
from fedllm.threads import set_threads
from fedllm.training import default_steps, round_learning_rate

log = logging.getLogger("fedllm")

# the optional checkpointed parts a run needs (Federation.checkpointed), and what a checkpoint lacking one lacks
LACKING = {
    "asynchrony": "the asynchronous clock and in-flight clients (written by a federation.mode=sync run?)",
    "clock": "the simulated clock (written without federation.devices, or by an older fedllm)",
}


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


class Federation:
    """A federation: the base model and adapter, the `Server` (the server half of every round),
    where the clients run (`fleet`: the simulation's `LocalFleet` unless given, e.g. a Flower
    deployment's parties), the optional simulated clock, checkpoints and metrics."""

    def __init__(self, recipe: Recipe, run_dir: Path, fleet: Fleet | None = None):
        self.recipe, self.run_dir = recipe, Path(run_dir)
        self.state = process_state()
        self.device, self.rank, self.world_size = self.state.device, self.state.process_index, self.state.num_processes
        self.is_main = self.state.is_main_process
        self.reducer = Reducer(self.device)
        self.group = client_groups(recipe.federation.group_size)  # G ranks train each client together
        self.layout = base_layout(recipe, self.group)  # where this rank's base lives
        self.sharded = self.layout.split is not None
        self.tokenizer, self.model, self.adapter = build_for_group(recipe, self.group, self.device)
        set_threads(recipe.client.threads, self.model)
        self.pad_token_id = self.tokenizer.pad_token_id
        self.params = self.adapter.trainable(self.model)
        self.fleet = fleet or LocalFleet(self.group, self.device)
        self.data = self.fleet.load_data(recipe, self.tokenizer, self.run_dir, self.device)
        self.strategy = STRATEGIES.build(recipe.strategy, "strategy")
        fed = recipe.federation
        self.participation = Participation(SAMPLERS.build(fed.sampler, "federation.sampler"), fed.num_clients,
                                           fed.sampled_per_round(), recipe.seed)
        self.codecs = [CODECS.build(c, f"codecs[{i}]") for i, c in enumerate(recipe.codecs)]
        self.strategy.setup(self.run_info())  # before init: e.g. a noise level chosen for the planned rounds
        self.attack = ATTACKS.build(recipe.byzantine, "byzantine") if recipe.byzantine else None
        self.byzantine = self.attack.choose(fed.num_clients, recipe.seed) if self.attack else set()
        for client_id in sorted(self.byzantine):
            self.data.clients[client_id] = self.attack.poison_data(self.data.clients[client_id],
                                                                 derive(recipe.seed, client_id, tag="poison"))
        global_state = self.adapter.state(self.model)  # the one extra copy of the trainable tensors
        self.channel = Channel(self.adapter, self.codecs, {k: tuple(t.shape) for k, t in global_state.items()})
        self.server = Server(
            # every rank starts from rank 0's server state (e.g. a secret DP noise generator)
            self.strategy, self.channel, global_state, broadcast_state_(self.strategy.init(global_state), self.device),
            self.reducer, num_clients=fed.num_clients, local_steps=recipe.client.max_steps or 0, seed=recipe.seed,
            own_aggregation=self.own_aggregation_of(), attack=self.attack, byzantine=frozenset(self.byzantine))
        self.client = Client(self.model, self.params, self.adapter, self.strategy, local_loop(recipe, self.adapter),
                             recipe.client, self.data.clients, self.pad_token_id, self.device, recipe.seed,
                             self.group) if self.fleet.trains_here else None
        # Ranks share per-client state through the run directory (budget 0: the disk is the store).
        budget = 0 if is_distributed() else int(fed.client_store_budget_mb * 2**20)
        self.store = ClientStore(self.run_dir / "client_store", budget)
        self.start_round = 0
        self.last_checkpoint_bytes = 0
        self.devices, self.clock, self.asynchrony = self._timeline()
        self.fleet.bind(self.server, self.participation, self.store, self.client, self.run_info(), self.model)
        self.accelerator = self._trackers()
        self.metrics = MetricsLog(self.run_dir, self.is_main, self.accelerator)

    def own_aggregation_of(self):
        """The adapter's own aggregation and download (Ferret's coordinate space under a plain
        mean: no full-size update per client), where it can run: a simulated attack needs every
        message, and remote parties are sent x^t whole (they do not apply compact aggregates)."""
        if self.attack is not None or not self.fleet.trains_here:
            return None
        return self.adapter.aggregation(self.strategy, self.recipe.seed)

    # the server's state, as the run's (checkpoints, export, tests)
    global_state = property(lambda self: self.server.global_state,
                            lambda self, value: setattr(self.server, "global_state", value))
    server_state = property(lambda self: self.server.server_state,
                            lambda self, value: setattr(self.server, "server_state", value))
    own_aggregation = property(lambda self: self.server.own_aggregation)

    def checkpointed(self) -> dict:
        """The optional collaborators whose state a checkpoint keeps, by their name in it."""
        parts = {"aggregation": self.server.own_aggregation, "asynchrony": self.asynchrony, "clock": self.clock}
        return {name: part for name, part in parts.items() if part is not None}

    def _timeline(self):
        """The simulated devices and clock (fedllm.asynchrony), where the recipe sets them."""
        fed = self.recipe.federation
        devices = Devices(fed.devices, self.recipe.client, self.data.clients, self.recipe.seed) if fed.devices else None
        self.adapter.assign_tiers(devices.tiers if devices else None, fed.num_clients)  # e.g. a LoRA rank per device tier
        if devices is None:
            return None, None, None
        if fed.mode == "sync":
            clock = self.participation = SyncClock(devices, self.participation, self.recipe.seed)  # draws among the online
            return devices, clock, None
        return devices, None, AsyncRounds(fed, self.recipe.client, fed.rounds, self.participation, devices, self.server,
                                          self.fleet, self.device)

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
            client_sizes=sizes, local_steps=[default_steps(r.client, n, r.federation.group_size) for n in sizes],
            batch_size=r.client.per_device_train_batch_size * r.client.gradient_accumulation_steps * r.federation.group_size,
            seed=r.seed,
            privacy=r.privacy.model_dump() if r.privacy else None,
        )

    # ---- one round ----------------------------------------------------------------------
    def run_round(self, t: int, progress=None) -> RoundResult:
        """Round t: the fleet's clients, the server's tail; `progress` (a tqdm bar) counts local steps."""
        start = time.perf_counter()
        if self.asynchrony is not None:
            rows, extra = self.asynchrony.round(t, progress)
            rows = sorted(rows, key=lambda row: row.client)
        else:
            lr = round_learning_rate(self.recipe.client, t, self.recipe.federation.rounds)
            round = self.server.open(t, lr)
            rows = self.fleet.run_round(t, round, lr, progress)
            round.close(rows)
            self.fleet.settle(t, rows)
            extra = self.clock.metrics(t, rows) if self.clock is not None else {}
        return RoundResult(self.global_state, self.server_state, rows, time.perf_counter() - start, extra)

    def evaluate(self, examples: list[dict]) -> dict:
        # a sharded base runs a forward only with its whole group: the groups split the batches,
        # and the leader's sums stand for the group's
        reducer, rank, world = ((Reducer(self.device, self.group.leader), self.group.index, self.group.count)
                                if self.sharded else (self.reducer, self.rank, self.world_size))
        if self.data.client_eval is not None:  # eval.per_client: `examples` is the union of the slices
            return evaluate_per_client(self.model, self.adapter, self.global_state, self.data.client_eval,
                                       self.recipe.eval, self.pad_token_id, reducer, rank, world)
        return evaluate(self.model, self.adapter, self.global_state, examples, self.recipe.eval, self.pad_token_id,
                        reducer, rank, world)

    def eval_due(self, rounds_done: int) -> bool:
        every = self.recipe.eval.every
        return bool(every and rounds_done % every == 0) or rounds_done == self.recipe.federation.rounds

    def round_eval(self, rounds_done: int) -> dict:
        """The eval metrics after `rounds_done` rounds where the recipe asks for them (the fleet's:
        a deployment's parties score it on their own rows), else {}."""
        if not self.eval_due(rounds_done):
            return {}
        return self.fleet.evaluate(rounds_done, lambda: self.evaluate(self.data.eval) if self.data.eval else {})

    # ---- life cycle -------------------------------------------------------------------
    def start(self) -> None:
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_atomically(self.run_dir / "recipe.yaml", dump_recipe(self.recipe))
            write_atomically(self.run_dir / "run_meta.json", json.dumps(self.run_meta(), indent=1))
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
            # rank 0's share of the model: with group_parallel=fsdp about 1/G of the base plus the whole adapter
            "client_group": {"size": self.group.size, "parallel": self.recipe.federation.group_parallel,
                             "rank0_parameter_bytes": resident_bytes(self.model)},
            # eval.per_client: which sampled rows each client holds out (fedllm.data.holdout)
            **({"client_eval_rows": self.data.client_eval_rows} if self.data.client_eval_rows is not None else {}),
            **self.fleet.run_meta(),
        }

    def resume(self) -> None:
        done = checkpoint_dirs(self.run_dir)
        if not done:
            # killed before its first checkpoint: nothing it wrote may leak into the new attempt
            log.info("no checkpoint in %s: starting from round 0", self.run_dir)
            if self.is_main:
                self.store.clear()
                for name in ("metrics.jsonl", "ledger.jsonl"):
                    truncate_jsonl(self.run_dir / name, 0)
                shutil.rmtree(self.run_dir / "final", ignore_errors=True)
            barrier()
            return
        path, parts, meta = self.newest_intact(done)
        self.global_state = {k: t.to(self.global_state[k].dtype) for k, t in parts["global"].items()}
        self.server_state = parts.get("server_state", {})
        torch.set_rng_state(parts["rng"]["torch"])
        for name, part in self.checkpointed().items():  # checkpoints before 0.1.x kept an aggregation's under "engine"
            part.load_state(parts.get(name, parts.get("engine", {})) if name == "aggregation" else parts[name])
        self.start_round = meta["round"]
        if self.is_main:
            self.store.restore(path / "clients", read_manifest(path, under="clients/"))
            for name in ("metrics.jsonl", "ledger.jsonl"):
                truncate_jsonl(self.run_dir / name, self.start_round)
        barrier()
        log.info("resumed %s after round %d", self.run_dir, self.start_round)

    def newest_intact(self, done: list[Path]) -> tuple[Path, dict, dict]:
        """The newest checkpoint that matches its manifest and fits this run; a damaged newer
        one is reported and skipped (output.keep_last keeps the older ones for this)."""
        for path in reversed(done):
            problem = verify_checkpoint(path)
            if problem is None:
                try:
                    parts, meta = read_checkpoint(path)
                    problem = self.misfit(parts, meta)
                except DAMAGE as err:
                    problem = f"it does not read back ({type(err).__name__}: {err})"
            if problem is None:
                return path, parts, meta
            log.warning("checkpoint %s is damaged: %s; falling back to the one before it", path, problem)
        raise RecipeError(f"no intact checkpoint in {self.run_dir} (see the warnings above): start the run again in a "
                          f"new directory, `fedllm run {self.run_dir / 'recipe.yaml'} output.name={self.run_dir.name}-new`")

    def misfit(self, parts: dict, meta: dict) -> str | None:
        """Why a checkpoint's contents cannot be this run's, or None."""
        stored = parts.get("global", {})
        if stored.keys() != self.global_state.keys():
            return "its global state has other tensors than this model's adapter"
        if bad := next((k for k, t in stored.items() if t.shape != self.global_state[k].shape), None):
            return f"its tensor {bad} has shape {tuple(stored[bad].shape)}, the model's is {tuple(self.global_state[bad].shape)}"
        if "rng" not in parts or not isinstance(meta.get("round"), int):
            return "its RNG state or round number is missing"
        if not 1 <= meta["round"] <= self.recipe.federation.rounds:
            return f"its round {meta['round']} is not one of this run's rounds 1..{self.recipe.federation.rounds}"
        if lacking := next((name for name in self.checkpointed() if name in LACKING and name not in parts), None):
            return f"it lacks {LACKING[lacking]}"
        if self.server_state and not parts.get("server_state"):
            return f"it lacks the server state strategy '{self.recipe.strategy['name']}' keeps"
        return None

    def checkpoint(self, rounds_done: int) -> None:
        if not self.recipe.output.checkpoints:  # the user's choice: no resume, no checkpoint writes
            return
        if self.is_main:
            parts = {**self.server.parts(), "rng": {"torch": torch.get_rng_state()},
                     **{name: part.state() for name, part in self.checkpointed().items()}}
            meta = {"round": rounds_done, "saved_at": time.time()}
            try:
                cost = write_checkpoint(self.run_dir, rounds_done, parts, self.store, meta, self.recipe.output.keep_last)
            except OSError as err:
                if err.errno == errno.ENOSPC:  # say where, and how much the last checkpoint took (if one was written)
                    last = (f" (the last one wrote {self.last_checkpoint_bytes:,} bytes)" if self.last_checkpoint_bytes
                            else " (its first)")
                    raise OSError(errno.ENOSPC, f"no space left on the device of {self.run_dir / 'checkpoints'} for the "
                                  f"checkpoint of round {rounds_done}{last}", err.filename) from err
                raise
            self.last_checkpoint_bytes = cost.bytes_written
            log.debug("checkpoint %s: %d bytes written, %d client files linked", cost.path, cost.bytes_written,
                      cost.files_linked)
        barrier()

    def run(self) -> list[dict]:
        r = self.recipe
        rows = []
        rounds = range(self.start_round, r.federation.rounds)
        bar = tqdm(rounds, desc="rounds", disable=not (self.is_main and show_progress(r.output.progress)), dynamic_ncols=True,
                   initial=self.start_round, total=r.federation.rounds)
        for t in bar:
            reason = self.strategy.stop_reason(t, self.server_state)
            if reason:
                log.warning("stopping before round %d: %s", t + 1, reason)
                if t > self.start_round and not (r.output.checkpoint_every and t % r.output.checkpoint_every == 0):
                    self.checkpoint(t)  # the last completed round must be on disk
                break
            mine = -(-r.federation.sampled_per_round() // self.group.count)
            steps = r.client.max_steps * mine if r.client.max_steps else None
            with tqdm(total=steps, desc=f"round {t + 1} local steps", leave=False, dynamic_ncols=True,
                      disable=not (self.is_main and show_progress(r.output.progress))) as steps_bar:
                result = self.run_round(t, steps_bar)
            self.global_state, self.server_state = result.global_state, result.server_state
            last = t + 1 == r.federation.rounds
            extra = {"seconds": result.seconds, **result.extra, **self.strategy.metrics(self.server_state)}
            if self.attack is not None:  # who the simulation made an attacker this round
                extra["attackers"] = sorted(set(self.participation.sampled(t)) & self.byzantine)
            for codec in self.codecs:
                extra.update(codec.accounting(t + 1))  # e.g. RQM's ε after t + 1 rounds
            extra.update(self.round_eval(t + 1))
            row = self.metrics.log_round(t + 1, result.stats, extra)  # round n: as checkpoints/round_n
            rows.append(row)
            bar.set_postfix({k: f"{row[k]:.4f}" for k in ("train_loss", "eval_loss") if row.get(k) is not None})
            if last or (r.output.checkpoint_every and (t + 1) % r.output.checkpoint_every == 0):
                self.checkpoint(t + 1)
        self.export_final()
        if self.accelerator is not None:
            self.accelerator.end_training()
        return rows

    def export_final(self) -> None:
        # the adapter's preferred format: a PEFT adapter where the update is one, else merged weights
        fmt = self.adapter.export_formats[0]
        with zero_whole_base(self.model, fmt == "merged" and self.layout.gather_for_merge):
            if self.is_main:
                write_export(self.adapter, self.model, self.tokenizer, self.global_state, self.run_dir / "final", fmt)
        barrier()


def run_recipe(path: str, overrides: list[str] = ()) -> Path:
    recipe = load_recipe(path, overrides)
    check_pairings(recipe)  # before any model is built
    check_writable(Path(recipe.output.dir))
    run_dir = new_run_dir(recipe, Path(path).stem, process_state(recipe.federation.collective_timeout_s).device)
    refuse_planted_links(run_dir)
    if (run_dir / "recipe.yaml").exists():
        raise RecipeError(f"{run_dir} already holds a run: continue it with `fedllm resume {run_dir}`, or give this "
                          "run another output.name")
    announce(run_dir)
    fed = Federation(recipe, run_dir)
    fed.start()
    fed.run()
    return run_dir


def announce(run_dir: Path) -> None:
    """The run directory, first: what `fedllm resume` needs after a kill."""
    if process_state().is_main_process:
        log.info("run directory: %s (after a kill: fedllm resume %s)", run_dir, run_dir)


def check_run_recipe(path: Path) -> None:
    """A run directory's recipe.yaml holds every section (fedllm writes it whole): an empty or
    cut one is an error, never a run with defaults."""
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        raw = None
    missing = sorted(set(Recipe.model_fields) - set(raw)) if isinstance(raw, dict) else ["all"]
    if missing:
        raise RecipeError(f"{path} is damaged (sections missing: {', '.join(missing)}): nothing to resume from; "
                          "start again with `fedllm run`")


def resume_run(run_dir: str, overrides: list[str] = (), trust_remote_code: bool = False) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no such directory: {run_dir} (give the run directory `fedllm run` printed)")
    if not (run_dir / "recipe.yaml").exists():
        raise FileNotFoundError(f"{run_dir} is not a fedllm run directory (no recipe.yaml)")
    refuse_planted_links(run_dir)
    check_run_recipe(run_dir / "recipe.yaml")
    announce(run_dir)
    done = max((int(p.name.split("_")[1]) for p in checkpoint_dirs(run_dir)), default=0)
    check_resume_overrides(load_recipe(run_dir / "recipe.yaml"), list(overrides), done)
    recipe = load_recipe(run_dir / "recipe.yaml", overrides)
    refuse_remote_code(recipe, run_dir / "recipe.yaml", trust_remote_code)
    check_pairings(recipe)
    process_state(recipe.federation.collective_timeout_s)  # the process group, before the Federation needs it
    fed = Federation(recipe, run_dir)
    if overrides:
        fed.start()  # the changed recipe.yaml: a later resume goes on with it
    fed.resume()
    fed.run()
    return run_dir

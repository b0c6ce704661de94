"""FederatedCallback: a `transformers.Trainer` (or TRL `SFTTrainer`) script becomes one
federated client per process.

    trainer = Trainer(model=peft_model, args=args, train_dataset=my_silo,
                      callbacks=[FederatedCallback(strategy="fedprox", local_steps=20)])
    # accelerate launch --multi_gpu --num_processes W my_script.py

Every process (rank) is one client training on its own data. Every `local_steps` optimizer
steps the callback runs one federated round over torch.distributed: the update
Δ = w − x^t goes through the adapter's `encode`, the codec chain and real serialization
(the ledger's bytes), is decoded, summed over ranks (all-reduce of the weighted sum, or an
all-gather for non-linear strategies), aggregated by the strategy on every rank alike, and
the new global state is loaded into the model. Optimizer and scheduler keep running.

Per-step gradient synchronisation: accelerate wraps the model in DistributedDataParallel,
which would average the gradients of all ranks at every optimizer step (the Trainer only
uses `no_sync` for the non-final micro-batches of an accumulation). At `on_train_begin` the
callback sets `require_backward_grad_sync = False` on the Trainer's DDP wrapper
(`trainer.model_wrapped`) — the flag `DDP.no_sync()` toggles, so the Trainer's own
`no_sync` contexts restore it to False — and `args.average_tokens_across_devices = False`
(else each rank's loss is normalised by the tokens of all ranks).

FSDP (accelerate's FSDP plugin, FSDP1 or FSDP2) or DeepSpeed (accelerate's DeepSpeed plugin,
ZeRO stage 2 or 3): the Trainer spreads ONE model over its ranks, so they train one client
together — a client group (README "Scaling"), with FSDP's or DeepSpeed's own gradient
reduction as the group's data parallelism. At each round the adapter is gathered whole (torch's
full state dict of the trainable tensors; DeepSpeed's GatheredParameters under ZeRO-3), rank 0
sends the group's update, and the new global adapter is written back into every rank's shards
(under DeepSpeed also into its optimizer's fp32 master copy, which its next step would otherwise
copy back). Strategies with client hooks (FedProx, SCAFFOLD, ...) are refused there: their
corrections act on whole gradients.

Strategy hooks run at `on_pre_optimizer_step`, which transformers calls AFTER its gradient
clipping: a correction (FedProx μ(w − x^t), SCAFFOLD c − c_i) is then not clipped. For the
built-in loop's order (hooks, then clipping) set `TrainingArguments(max_grad_norm=0)` and
`FederatedCallback(max_grad_norm=...)`: the callback clips after the hooks.

Data: accelerate shards the dataset each process passes to its Trainer (rank r reads
batches r, r+W, ... of it). One dataset loaded by every process thus becomes an IID split
over the clients; a silo that loads its own data sees 1/W of it per Trainer epoch. Every
rank must run the same number of steps (set `max_steps`): the rounds are collectives.

Resume: `on_save` writes `checkpoint-<step>/fedllm/` (x^t, server state, round; per rank
the client state, local weights and optimizer moments, which the Trainer saves for rank 0
only); `on_train_begin` restores them when the Trainer resumes. Exact at any step for hooks
without state inside a round (FedProx, SCAFFOLD); SCAFFOLD-M's gradient sum restarts.
"""
from __future__ import annotations

import gc
import json
import logging
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback

from fedllm import zero
from fedllm.channel import Channel
from fedllm.client import Client
from fedllm.distributed import (
    Reducer, all_gather_rows, barrier, broadcast_state_, gather_trainable, is_distributed, scatter_trainable_,
)
from fedllm.loops.trainer import ReplayLastBatch
from fedllm.metrics import rejection_code
from fedllm.recipe import ClientConfig
from fedllm.registry import ADAPTERS, CODECS, STRATEGIES, RecipeError
from fedllm.server import ClientRow, Server, gather_rows
from fedllm.strategies.base import ClientContext, RunInfo, split_prefix, with_prefix
from fedllm.training import REGRAD, lacking, load_optimizer_state, optimizer_state_to_tensors
from fedllm.wire import WireContext

log = logging.getLogger("fedllm")

STATE_DIR = "fedllm"  # inside the Trainer's checkpoint-<step>/ folder


def build_plugin(registry, spec, where: str):
    """A plugin instance from an instance, a name, or a `{"name": ..., **options}` dict."""
    if spec is None or not isinstance(spec, (str, dict)):
        return spec
    return registry.build({"name": spec} if isinstance(spec, str) else spec, where)


def owning_trainer(callback: TrainerCallback) -> Trainer:
    # Callbacks are not handed their Trainer, and the DDP wrapper, the accelerator and
    # `Trainer.log` (the only way to reach the `report_to` trackers, which run before user
    # callbacks) live on it: find it once, at the start of training.
    for obj in gc.get_objects():
        if issubclass(type(obj), Trainer) and callback in obj.callback_handler.callbacks:
            return obj
    raise RuntimeError("FederatedCallback must be passed to a transformers.Trainer (callbacks=[...])")


def sharding(trainer: Trainer) -> str | None:
    """How the Trainer spreads ONE model over its ranks, which are then one client: "fsdp",
    "deepspeed" (any ZeRO stage: its engine averages the gradients of all ranks), or None."""
    kind = str(trainer.accelerator.distributed_type)
    return "fsdp" if "FSDP" in kind else "deepspeed" if "DEEPSPEED" in kind else None


def switch_off_gradient_sync(trainer: Trainer) -> bool:
    """Stops DDP from averaging gradients across ranks; True if there was a wrapper."""
    wrapped = trainer.model_wrapped
    if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
        wrapped.require_backward_grad_sync = False
        return True
    return False


class FederatedCallback(TrainerCallback):
    """Turns each process of a Trainer run into a federated client.

    `recipe`: a fedllm Recipe (its adapter, strategy, codecs, seed and `client.max_steps`
    as `local_steps`), or give them one by one: `strategy` and `adapter` as instances,
    registered names or `{"name": ..., **options}` dicts, `codecs` a list of those.
    `local_steps`: optimizer steps between two synchronisations. `num_samples`: this
    client's FedAvg weight (default: the length of the Trainer's train dataset).
    `client_id`: default the process rank. `max_grad_norm`: clip after the strategy hooks
    (use with `TrainingArguments(max_grad_norm=0)`)."""

    supports = frozenset({REGRAD})  # what the strategy hooks may ask of a Trainer (fedllm.training.CAPABILITIES)

    def __init__(self, recipe=None, *, strategy="fedavg", adapter="lora", codecs=(), local_steps: int | None = None,
                 num_samples: int | None = None, client_id: int | None = None, seed: int = 0,
                 max_grad_norm: float | None = None, privacy: dict | None = None):
        if recipe is not None:
            strategy, adapter, codecs = recipe.strategy, recipe.adapter, recipe.codecs
            local_steps, seed = local_steps or recipe.client.max_steps, recipe.seed
            privacy = recipe.privacy.model_dump() if recipe.privacy else privacy
        if not local_steps or local_steps <= 0:
            raise ValueError("FederatedCallback needs local_steps > 0 (optimizer steps between synchronisations)")
        self.strategy = build_plugin(STRATEGIES, strategy, "strategy")
        self.adapter = build_plugin(ADAPTERS, adapter, "adapter")
        if what := lacking(self.strategy.client_needs, self.supports):
            raise RecipeError(f"strategy '{type(self.strategy).__name__}' needs {what}, which FederatedCallback does not "
                              "offer (a Trainer runs its own backward and a fixed number of steps): use `fedllm run`")
        self.channel = Channel(self.adapter, [build_plugin(CODECS, c, f"codecs[{i}]") for i, c in enumerate(codecs)])
        self.local_steps, self.num_samples, self.client_id, self.seed = local_steps, num_samples, client_id, seed
        self.max_grad_norm = max_grad_norm
        self.privacy = privacy
        self.round = 0
        self.trainer = None

    # ---- Trainer events -----------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        self.trainer = owning_trainer(self)
        self.model, self.device = model, args.device
        self.world_size = torch.distributed.get_world_size() if is_distributed() else 1
        rank = torch.distributed.get_rank() if is_distributed() else 0
        self.sharding = sharding(self.trainer)
        self.sharded = self.sharding is not None
        # sharded: all ranks are one client (rank 0 speaks for it); else every rank is a client
        self.leader, self.clients = (rank == 0, 1) if self.sharded else (True, self.world_size)
        self.client_id = (0 if self.sharded else rank) if self.client_id is None else self.client_id
        self.check_schedule(args, state)
        if self.sharded:
            if self.strategy.client_hooks(0, self.client_id) is not None:
                raise ValueError(f"strategy '{type(self.strategy).__name__}' has client hooks, which act on whole "
                                 f"gradients; under {self.sharding} use a strategy without them (fedavg, fedavgm, fedadam, "
                                 "a robust rule)")
            log.info("FederatedCallback: %s spreads one client over the %d ranks; they meet every %d steps",
                     self.sharding, self.world_size, self.local_steps)
        else:
            if switch_off_gradient_sync(self.trainer):
                log.info("FederatedCallback: DDP gradient all-reduce off; ranks meet every %d steps", self.local_steps)
            args.average_tokens_across_devices = False  # read at every step: each client's loss is its own
        if self.num_samples is None:
            dataset = getattr(train_dataloader, "dataset", None)
            self.num_samples = len(dataset) if hasattr(dataset, "__len__") else 1
        self.strategy.setup(self.run_info(args, state))  # before init, as the engine: e.g. DP's noise level
        self.params = self.adapter.trainable(model)
        # the Trainer trains; the Client drives the strategy's hooks around its steps (begin / finish)
        self.client = Client(model, self.params, self.adapter, self.strategy, None,
                             ClientConfig(max_grad_norm=self.max_grad_norm or None), [], None, self.device, self.seed)
        self.reducer = Reducer(self.device)
        self.regrad = ReplayLastBatch(model, self.params, args)
        self.resumed_lr = None
        if state.global_step > 0:
            self.load_state(Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_DIR)
        else:
            self.round = 0
            self.global_state = {k: t.detach().cpu().clone() for k, t in self.adapter_weights().items()}
            # every rank starts from rank 0's server state (a DP strategy's secret noise generator)
            self.server_state = broadcast_state_(self.strategy.init({k: t.float() for k, t in self.global_state.items()}),
                                                 self.device)
            self.client_state = {}
        self.server = Server(self.strategy, self.channel, self.global_state, self.server_state, self.reducer,
                             num_clients=self.clients, local_steps=self.local_steps, seed=self.seed)
        self.begin_round()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.local.driver.before_optimizer(self.regrad)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.local_steps == 0:
            metrics = self.synchronise()
            self.trainer.log(metrics)

    def on_save(self, args, state, control, **kwargs):
        self.save_state(Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_DIR)

    def on_train_end(self, args, state, control, **kwargs):
        # a schedule that ends mid-round ends with one last (shorter) round, so that the
        # model the script saves is the global one; an interrupted run does not sync
        if state.global_step >= state.max_steps and state.global_step % self.local_steps:
            self.trainer.log(self.synchronise())
        self.regrad.remove()

    # ---- one round --------------------------------------------------------------------
    def begin_round(self) -> None:
        """x^t and the strategy's broadcast as a client decodes them; the hooks begin."""
        self.adapter.prepare_local_round(self.model)
        down = self.channel.down(self.global_state, self.strategy.broadcast(self.server_state), self.device,
                                 WireContext(self.round, self.client_id, self.seed))
        self.x_t, broadcast, self.bytes_down = down.x_t, down.broadcast, down.bytes_for(self.client_id)
        hooks = self.client.hooks(self.client_id, self.round)
        # the lr of the round's first step (a resume mid-round brings back the round's own)
        lr = self.resumed_lr if self.resumed_lr is not None else self.trainer.optimizer.param_groups[0]["lr"]
        self.resumed_lr = None
        self.local = self.client.begin(hooks, ClientContext(self.round, self.client_id, self.x_t, broadcast,
                                                            self.client_state, lr, self.local_steps))
        self.lr = lr

    @torch.no_grad()
    def synchronise(self) -> dict:
        """Ends the round on every rank with the identical new global state (the server's one
        round tail, as every driver's); returns its metrics."""
        local = self.adapter_weights()
        update = {k: t.detach().float() - self.x_t[k].float().to(t.device) for k, t in local.items()}
        update, extras, client_state = self.client.finish(self.local, update)
        if client_state is not None:
            self.client_state = {k: t.detach().cpu() for k, t in client_state.items()}
        message, bytes_up = self.channel.up(update, extras, WireContext(self.round, self.client_id, self.seed), {})
        weight = 1.0 if self.strategy.uniform_weights else float(self.num_samples)
        self.server.global_state, self.server.server_state = self.global_state, self.server_state
        round = self.server.open(self.round, self.lr)
        rows = []
        if self.leader:  # a client group counts once
            rejection = round.admit(self.client_id, message, weight)
            rows = [ClientRow(self.client_id, self.num_samples, math.nan, bytes_up, self.bytes_down, rejection is None,
                              self.local_steps, rejected=rejection_code(rejection))]
        rows = gather_rows(rows, self.device)
        round.close(rows)  # every rank holds the same aggregate, so every rank takes or refuses it alike
        self.global_state = {k: t.cpu() for k, t in self.server.global_state.items()}
        self.server_state = self.server.server_state
        self.load_adapter(self.global_state)
        self.round += 1
        self.begin_round()
        return {
            "fed/round": self.round, "fed/clients": sum(r.accepted for r in rows),
            "fed/rejected": sum(not r.accepted for r in rows),
            "fed/bytes_up": sum(r.bytes_up for r in rows), "fed/bytes_down": sum(r.bytes_down for r in rows),
            **{f"fed/{k}": v for k, v in self.strategy.metrics(self.server_state).items()},  # e.g. the ε spent
        }

    def run_info(self, args, state) -> RunInfo:
        """The run's shape as the strategy's `setup` reads it: every rank is a client in every
        round, for as many rounds as the Trainer's steps allow."""
        mine = torch.tensor([[float(self.num_samples)]] if self.leader else [], dtype=torch.float64).reshape(-1, 1)
        sizes = all_gather_rows(mine, args.device)
        return RunInfo(
            rounds=math.ceil(state.max_steps / self.local_steps), num_clients=self.clients,
            clients_per_round=self.clients, sampler="uniform", client_sizes=[int(n) for n in sizes.flatten().tolist()],
            local_steps=[self.local_steps] * self.clients,
            batch_size=args.per_device_train_batch_size * args.gradient_accumulation_steps, seed=self.seed,
            privacy=self.privacy,
        )

    # ---- the adapter, whole or in shards -------------------------------------------------------
    def adapter_weights(self) -> dict:
        """The trainable tensors as the client's local weights (gathered from the shards under
        FSDP, from the partitions under DeepSpeed ZeRO-3)."""
        if self.sharded:
            gather = zero.gather_trainable if self.sharding == "deepspeed" else gather_trainable
            return gather(self.trainer.model_wrapped)
        return {k: p.detach() for k, p in self.params.items()}

    def load_adapter(self, state: dict) -> None:
        if self.sharded:  # DeepSpeed: also into its optimizer's fp32 master weights
            scatter = zero.scatter_trainable_ if self.sharding == "deepspeed" else scatter_trainable_
            scatter(self.trainer.model_wrapped, state)
        else:
            self.adapter.load(self.model, {k: t.to(self.device) for k, t in state.items()}, self.params)

    # ---- checks --------------------------------------------------------------------------
    def check_schedule(self, args, state) -> None:
        # every rank must run the same number of steps, or the collectives would deadlock
        steps = all_gather_rows(torch.tensor([[float(state.max_steps)]], dtype=torch.float64), args.device)
        if steps.min() != steps.max():
            raise ValueError(f"ranks plan different numbers of steps {steps.flatten().tolist()}: set max_steps")
        if args.save_strategy == "steps" and args.save_steps % self.local_steps:
            log.warning("save_steps=%s is not a multiple of local_steps=%d: a resume mid-round re-begins the strategy "
                        "hooks from x^t (exact for stateless hooks such as FedProx)", args.save_steps, self.local_steps)
        if self.max_grad_norm and args.max_grad_norm > 0:
            log.warning("both the Trainer (max_grad_norm=%s) and the callback clip", args.max_grad_norm)

    # ---- checkpoint -------------------------------------------------------------------------
    def save_state(self, folder: Path) -> None:
        """Rank 0: x^t of the current round, the server state, the round. Every rank: its
        client state, its local weights and optimizer moments — the Trainer saves only rank
        0's model and optimizer, and DDP broadcasts rank 0's weights when it wraps the model."""
        folder.mkdir(parents=True, exist_ok=True)
        if not is_distributed() or torch.distributed.get_rank() == 0:
            save_file({k: t.contiguous() for k, t in self.global_state.items()}, str(folder / "global.safetensors"))
            save_file({k: t.contiguous().cpu() for k, t in self.server_state.items()}, str(folder / "server_state.safetensors"))
            meta = {"round": self.round, "local_steps": self.local_steps, "world_size": self.world_size, "lr": self.lr}
            (folder / "meta.json").write_text(json.dumps(meta))
        local = self.adapter_weights()
        # under FSDP the optimizer's moments are sharded: the Trainer's own checkpoint saves them
        optim = {} if self.sharded else optimizer_state_to_tensors(self.trainer.optimizer)
        client = {**with_prefix(self.client_state, "state/"), **with_prefix(local, "local/"), **with_prefix(optim, "optim/")}
        if self.leader:
            save_file({k: t.contiguous().cpu() for k, t in client.items()}, str(folder / f"client_{self.client_id}.safetensors"))
        barrier()

    def load_state(self, folder: Path) -> None:
        if not (folder / "meta.json").exists():
            raise FileNotFoundError(f"resuming without fedllm state: {folder} is missing (the callback saves it into "
                                    "args.output_dir/checkpoint-<step>/; resume from there)")
        meta = json.loads((folder / "meta.json").read_text())
        if meta["local_steps"] != self.local_steps or meta["world_size"] != self.world_size:
            raise ValueError(f"checkpoint was made with {meta}; this run has local_steps={self.local_steps}, "
                             f"world_size={self.world_size}")
        self.round, self.resumed_lr = meta["round"], meta["lr"]
        dtypes = {k: t.dtype for k, t in self.adapter_weights().items()}
        self.global_state = {k: t.to(dtypes[k]) for k, t in load_file(str(folder / "global.safetensors")).items()}
        self.server_state = load_file(str(folder / "server_state.safetensors"))
        client = load_file(str(folder / f"client_{self.client_id}.safetensors"))
        rest, self.client_state = split_prefix(client, "state/")
        rest, local = split_prefix(rest, "local/")
        _, optim = split_prefix(rest, "optim/")
        self.load_adapter(local)
        if optim:
            load_optimizer_state(self.trainer.optimizer, optim)

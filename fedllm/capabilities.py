"""Plugin pairings checked when a recipe loads, before any data is prepared or model built:
what the strategy's client hooks need of the local loop (fedllm.training.CAPABILITIES), what
the strategy needs of the federation's shape, and what the federation's mode (async,
buffered, deployed) allows. A pairing that cannot run fails here, in one line naming both
things and what to change — never mid-run. (A privacy wrapper refuses an inner strategy it
would break in its own constructor, which also runs here.)"""
from __future__ import annotations

import importlib.util
import logging

from fedllm.distributed import launched_world_size
from fedllm.loops import loop_for
from fedllm.recipe import Recipe
from fedllm.registry import ADAPTERS, CODECS, STRATEGIES, RecipeError
from fedllm.strategies.base import ALL
from fedllm.training import GROUP, PER_EXAMPLE, LocalLoop, lacking

log = logging.getLogger("fedllm")


def local_loop(recipe: Recipe, adapter) -> LocalLoop:
    """The adapter's own loop if it brings one (SFPrompt), else the recipe's `client.trainer`."""
    return adapter.local_loop() or loop_for(recipe.client.trainer, recipe.client.optim)


def check_pairings(recipe: Recipe, deployed: bool = False, world_size: int | None = None) -> None:
    """`deployed`: the recipe is served to parties over Flower (fedllm serve). `world_size`: the
    ranks that will run it (default: those of this launch)."""
    strategy = STRATEGIES.build(recipe.strategy, "strategy")
    adapter = ADAPTERS.build(recipe.adapter, "adapter")
    loop = local_loop(recipe, adapter)
    what = lacking(strategy.client_needs, loop.supports)
    if what:
        fix = ("use another strategy or adapter" if adapter.local_loop() is not None
               else "use client.trainer=builtin or another strategy")
        raise RecipeError(f"strategy '{recipe.strategy['name']}' needs {what}, which {loop.name} does not offer: {fix}")
    for spec in recipe.codecs:
        if strategy.counts_in_extras and CODECS.build(spec, "codecs").randomizes:
            raise RecipeError(f"strategy '{recipe.strategy['name']}' counts 0/1 flags in its uploads, which codec "
                              f"'{spec['name']}' randomizes: remove that codec or use another strategy")
    strategy.check_federation(recipe.federation.sampled_per_round())
    check_groups(recipe, strategy, loop)
    if recipe.client.optim == "zo":
        check_zeroth_order(recipe, strategy, adapter)
    if deployed:
        check_deployment(recipe)
    if recipe.federation.mode != "sync":
        check_asynchrony(recipe, strategy, adapter, launched_world_size() if world_size is None else world_size)
    check_local_optimizer(recipe, strategy)


def check_asynchrony(recipe: Recipe, strategy, adapter, world_size: int) -> None:
    """federation.mode=async|buffered: one simulated clock in one process, updates through the
    strategy's collector, no simulated attack; async applies each arrival alone."""
    mode, name = recipe.federation.mode, recipe.strategy["name"]
    if world_size > 1:
        raise RecipeError(f"federation.mode={mode} runs in one process, and this launch starts {world_size}: launch one "
                          "process (no torchrun, accelerate launch or --processes), or use federation.mode=sync")
    if recipe.byzantine is not None:
        raise RecipeError(f"byzantine '{recipe.byzantine['name']}' simulates an attack, which federation.mode={mode} does "
                          "not: remove byzantine, or use federation.mode=sync")
    if adapter.aggregation(strategy, recipe.seed) is not None:
        raise RecipeError(f"adapter '{recipe.adapter['name']}' aggregates in its own way under strategy '{name}', and "
                          f"federation.mode={mode} applies updates through the strategy's plain collector: use "
                          "federation.mode=sync")
    if mode == "async" and strategy.needs == ALL:
        raise RecipeError(f"strategy '{name}' needs every update of a round, and federation.mode=async applies each "
                          "arrival alone: use federation.mode=buffered (over each buffer of K) or sync")


def check_deployment(recipe: Recipe) -> None:
    """A Flower deployment has real devices and real parties: nothing of them is simulated."""
    if recipe.federation.devices is not None:
        raise RecipeError("federation.devices simulates client devices, and a Flower deployment (fedllm serve) has "
                          "real ones: remove federation.devices, or use `fedllm run` (simulation)")
    if recipe.byzantine is not None:
        raise RecipeError(f"byzantine '{recipe.byzantine['name']}' simulates attackers, and a Flower deployment "
                          "(fedllm serve) has real parties: remove byzantine, or use `fedllm run` (simulation)")


def check_groups(recipe: Recipe, strategy, loop: LocalLoop) -> None:
    """federation.group_size > 1: a loop that can split a client's batch over a group, and no
    per-micro-batch backward of a strategy's own unless it trains as its share of the group's
    batch (dp_sgd, dp_brem: sums over the group; adversarial: its share's loss weighted)."""
    fed = recipe.federation
    if fed.group_size == 1:
        if fed.group_parallel != "ddp":
            raise RecipeError(f"federation.group_parallel={fed.group_parallel} shards a client over a group of ranks: "
                              "set federation.group_size > 1 (a divisor of the launched processes)")
        return
    if fed.group_parallel == "zero3" and importlib.util.find_spec("deepspeed") is None:
        raise RecipeError("federation.group_parallel=zero3 needs DeepSpeed, which is not installed: "
                          "pip install 'fedllm[gpu]' (or deepspeed), or use group_parallel=fsdp")
    if fed.group_parallel == "zero3" and (recipe.model.device_map is not None or recipe.model.quantization != "none"):
        what = "model.device_map" if recipe.model.device_map is not None else f"model.quantization={recipe.model.quantization}"
        raise RecipeError(f"{what} is not combined with DeepSpeed ZeRO-3's partitioning (federation.group_parallel=zero3): "
                          f"drop {what.split('=')[0]}, or use federation.group_parallel=ddp")
    if fed.group_parallel == "zero3" and strategy.uses_torch_func:
        raise RecipeError(f"strategy '{recipe.strategy['name']}' takes per-example gradients through torch.func, which "
                          "crashes inside DeepSpeed ZeRO-3's module hooks: set strategy.per_example=loop, or use "
                          "federation.group_parallel=fsdp")
    if GROUP not in loop.supports:
        raise RecipeError(f"federation.group_size={fed.group_size} needs a local loop that trains one client on a group of "
                          f"ranks; {loop.name} does not: use client.trainer=builtin (and an adapter without its own loop), "
                          "or federation.group_size=1")
    if fed.group_parallel == "fsdp":
        check_fsdp_load(recipe)
    if PER_EXAMPLE in strategy.client_needs and not strategy.per_example_in_groups:
        raise RecipeError(f"strategy '{recipe.strategy['name']}' runs its own backward on each micro-batch with each rank's "
                          "own loss, so a client group would not train as one rank with the group's batch (dp_sgd and "
                          "dp_brem sum theirs over the group, adversarial weights its share): use federation.group_size=1")


def check_fsdp_load(recipe: Recipe) -> None:
    """A base sharded over a group is one plain model: no accelerate placement of its own, and
    under fsdp_load=leader nothing that cannot be built on the meta device and filled later."""
    model, fed = recipe.model, recipe.federation
    if model.device_map is not None:
        raise RecipeError("model.device_map places a whole base on each rank, federation.group_parallel=fsdp shards it "
                          "over the group: drop model.device_map (or use federation.group_parallel=ddp)")
    if fed.fsdp_load == "leader" and model.quantization != "none":
        raise RecipeError(f"model.quantization={model.quantization} weights cannot be built empty and filled from the "
                          "group's leader: set federation.fsdp_load=every_rank (every rank loads the whole base)")


def check_zeroth_order(recipe: Recipe, strategy, adapter) -> None:
    """client.optim=zo steps without gradients and sends (seed, scalar) pairs: no gradient
    hooks, no adapter with its own loop or wire format, no Trainer."""
    name = recipe.strategy["name"]
    if strategy.client_hooks(0, 0) is not None:
        raise RecipeError(f"client.optim=zo trains without gradients, so strategy '{name}' cannot run its client-side "
                          "hooks: use a strategy without them (fedavg, fedavgm, fedadam/fedyogi/fedadagrad, a robust rule)")
    if adapter.local_loop() is not None or not adapter.plain_wire:
        raise RecipeError(f"client.optim=zo needs an adapter whose trainable tensors are its update; adapter "
                          f"'{recipe.adapter['name']}' has its own local loop or wire format: use lora, ffa_lora, wara or full")
    if recipe.client.trainer != "builtin":
        raise RecipeError("client.optim=zo runs its own forward-only loop: set client.trainer=builtin")


def check_local_optimizer(recipe: Recipe, strategy) -> None:
    """A strategy derived for SGD local steps, run with AdamW, does not learn (SCAFFOLD on real
    text: eval 4.44 -> 4.49 where FedAvg reaches 3.92): a warning with the fix."""
    wanted, name = strategy.local_optimizer, recipe.strategy["name"]
    if wanted is not None and recipe.client.optim != wanted:
        log.warning("strategy '%s' is derived for client.optim=%s local steps; with client.optim=%s its correction "
                    "misleads the optimizer and the run may not learn: set client.optim=%s (with a larger "
                    "client.learning_rate, e.g. 0.05) or use fedavg", name, wanted, recipe.client.optim, wanted)

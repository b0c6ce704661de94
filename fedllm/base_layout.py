"""Where this rank's base model lives, decided once from the recipe and the rank's client group
(`base_layout`), and the build that follows the decision (`build_for_group`).

One rank per client (or ddp) holds the whole base; a client group of G ranks under
federation.group_parallel=fsdp shards it with FSDP2 (fedllm.distributed.shard_base), under
zero3 DeepSpeed partitions it (fedllm.zero, imported only when chosen: DeepSpeed is optional).
model.device_map and model.quantization hand the placement to accelerate and bitsandbytes
(fedllm.placement, fedllm.models); capabilities.check_groups refuses the combinations of the
two that cannot run, before anything is built."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch

from fedllm.distributed import ClientGroup, shard_base
from fedllm.models import build_model
from fedllm.recipe import Recipe
from fedllm.registry import ADAPTERS


@dataclass(frozen=True)
class BaseLayout:
    """Where and how this rank's base lives."""

    split: Literal["fsdp", "zero3"] | None  # how the client group shares it; None: whole on this rank
    from_leader: bool  # fsdp_load=leader: only the group's leader builds it for real (on the CPU) and sends the shards
    empty: bool  # built on the meta device, its shards filled from the leader (a non-leader under from_leader)
    partition_while_built: bool  # zero3: partitioned as it is built, else built whole and partitioned after attach
    placed: bool  # accelerate places it (model.device_map, or bitsandbytes weights): never moved with .to
    gather_for_merge: bool  # merged weights need the whole base gathered first (zero3 releases its partitions)

    def build_device(self, device: torch.device) -> torch.device | None:
        """Where build_model puts it: None (the CPU, or the meta device) when the leader fills the shards."""
        return None if self.from_leader else device


def base_layout(recipe: Recipe, group: ClientGroup) -> BaseLayout:
    """The one decision of where this rank's base lives (a pure function of its arguments)."""
    fed, model = recipe.federation, recipe.model
    split = fed.group_parallel if group.size > 1 and fed.group_parallel in ("fsdp", "zero3") else None
    from_leader = split == "fsdp" and fed.fsdp_load == "leader"
    # an adapter that reads base weights at attach (Ferret, SFPrompt) needs them whole then
    reads_base_at_attach = not ADAPTERS.get(recipe.adapter["name"]).trains_through_offload
    return BaseLayout(
        split=split,
        from_leader=from_leader,
        empty=from_leader and not group.leader,
        partition_while_built=split == "zero3" and not reads_base_at_attach,
        placed=model.device_map is not None or model.quantization != "none",
        gather_for_merge=split == "zero3",
    )


def build_for_group(recipe: Recipe, group: ClientGroup, device):
    """Tokenizer, model and adapter of this rank (models.build_model), with the base where
    base_layout puts it: sharded over the group under fsdp (built for real by the leader alone
    under fsdp_load=leader), partitioned by DeepSpeed under zero3."""
    layout = base_layout(recipe, group)
    tokenizer, model, adapter = build_model(recipe, layout.build_device(device), empty=layout.empty,
                                            zero_group=group if layout.partition_while_built else None)
    if layout.split == "fsdp":
        shard_base(model, adapter.trainable(model), group, device, from_leader=layout.from_leader)
    elif layout.split == "zero3":
        zero_partition_base(model, adapter.trainable(model), group, device)
    return tokenizer, model, adapter


def resident_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters this rank holds (an FSDP-sharded tensor counts its local shard, a
    released ZeRO-3 weight its partition)."""
    local = lambda p: p.to_local() if hasattr(p, "to_local") else p  # noqa: E731  (a DTensor's shard)
    partition = lambda p: p.ds_tensor if p.numel() == 0 and hasattr(p, "ds_tensor") else p  # noqa: E731  (ZeRO-3's)
    return sum(partition(local(p)).numel() * p.element_size() for p in model.parameters())


def zero_partition_base(*args) -> None:
    from fedllm.zero import partition_base  # DeepSpeed, imported only when chosen

    partition_base(*args)


def zero_whole_base(model: torch.nn.Module, enabled: bool):
    """Merged weights need the whole base (BaseLayout.gather_for_merge): under zero3 each rank of a
    group gathers its partitions."""
    if not enabled:
        return contextlib.nullcontext()
    from fedllm.zero import whole_base

    return whole_base(model)

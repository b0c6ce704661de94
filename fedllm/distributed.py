"""The few torch.distributed collectives the engine needs (gloo on CPU, nccl on GPU).
Tensors only: nothing is pickled between processes."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from accelerate import PartialState


def process_state(timeout_s: float | None = None) -> PartialState:
    """The process group, created on the first call (later calls return it, whatever they pass).
    `timeout_s`: how long a collective may wait for the other ranks before failing."""
    # A bare PartialState() under torchrun on a CPU-only machine is not distributed: ask for
    # the CPU (gloo) state explicitly when there is no CUDA.
    options = {"timeout": timedelta(seconds=timeout_s)} if timeout_s is not None else {}
    return PartialState(cpu=not torch.cuda.is_available(), **options)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def launched_world_size() -> int:
    """How many ranks this launch started, known before the process group exists: torchrun,
    accelerate launch and `fedllm run --processes` set WORLD_SIZE in every rank's environment."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE") or 1)


def all_reduce_sum_(flat: torch.Tensor, device: torch.device, group=None) -> torch.Tensor:
    if is_distributed():
        on_device = flat.to(device)
        dist.all_reduce(on_device, op=dist.ReduceOp.SUM, group=group)
        flat.copy_(on_device.to(flat.device))
    return flat


@dataclass(frozen=True)
class ClientGroup:
    """This rank's client group: the W launched ranks form W/G groups of G consecutive ranks
    (group g holds ranks gG … gG+G−1); a group trains one client at a time, data parallel
    inside it, and its leader (member 0) speaks for it in every collective across groups."""

    size: int  # G
    index: int  # g: the groups split a round's clients as single ranks do with G = 1
    count: int  # W/G
    member: int  # this rank's place in its group
    handle: object = None  # the torch.distributed subgroup of the G ranks (None: G = 1)

    @property
    def leader(self) -> bool:
        return self.member == 0


def client_groups(size: int) -> ClientGroup:
    """This rank's ClientGroup (every rank must call it: creating subgroups is collective)."""
    world, rank = (dist.get_world_size(), dist.get_rank()) if is_distributed() else (1, 0)
    if world % size:
        raise ValueError(f"federation.group_size={size} does not divide the {world} launched processes: launch a "
                         f"multiple of {size} processes or set a group_size that divides {world}")
    handle = None
    if size > 1:
        # new_group is collective over the whole world: every rank creates every group, in order
        for g in range(world // size):
            made = dist.new_group(list(range(g * size, (g + 1) * size)))
            handle = made if g == rank // size else handle
    return ClientGroup(size, rank // size, world // size, rank % size, handle)


def shard_base(model: torch.nn.Module, trainable: dict, group: ClientGroup, device: torch.device,
               from_leader: bool = False) -> None:
    """FSDP inside a client group (FSDP2 `fully_shard` over the group's ranks): the frozen base
    weights are sharded, block by block, so each rank holds 1/G of them and all-gathers a block
    for its forward and backward. The trainable adapter stays whole on every rank (FSDP's
    `ignored_params`): the adapter code reads and writes it as with G = 1, and its gradients
    are averaged in the group like in ddp mode (group_mean_).
    `from_leader`: only the leader built the real model (on the CPU); the others built it on
    the meta device (models.build_model(empty=True)) and receive their shards, the adapter
    and the buffers from it (fill_from_leader_), so no rank but the leader holds the whole base."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    mesh = DeviceMesh.from_group(group.handle, device.type)
    keep = set(trainable.values())
    if from_leader and group.leader:  # before sharding, from the whole tensors, which sharding then frees block by block
        fill_from_leader_(model, keep, group, device)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    blocks = set(getattr(base, "_no_split_modules", None) or ())  # a Hugging Face model's decoder layers
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh, ignored_params=keep)
    fully_shard(model, mesh=mesh, ignored_params=keep)
    if from_leader and not group.leader:
        materialise_(model, device)
        fill_from_leader_(model, keep, group, device)


def materialise_(model: torch.nn.Module, device: torch.device) -> None:
    """Uninitialised storage for every tensor on the meta device (FSDP2's deferred init: a
    sharded parameter gets only this rank's shard), keeping each Parameter object, so dicts
    of them (the adapter's trainable tensors) stay valid."""
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to_empty(device=device)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)


def named_tensors(model: torch.nn.Module):
    """Every parameter, then every buffer, by name, in the same order on every rank; a shared
    tensor under each of its names (whether a tensor is shared may differ between ranks: a
    buffer moved `.to` the meta device is a new tensor per module)."""
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def check_same_structure(model: torch.nn.Module, group: ClientGroup, device: torch.device) -> None:
    """Every rank of the group holds the leader's tensor names, shapes and dtypes, in its order
    (else the fill would pair the wrong tensors, or wait forever): compared as a digest."""
    digest = hashlib.sha256()
    for name, tensor in named_tensors(model):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
    mine = torch.tensor([int.from_bytes(digest.digest()[:7], "little")], dtype=torch.int64, device=device)
    leaders = mine.clone()
    dist.broadcast(leaders, group=group.handle, group_src=0)
    differs = (mine != leaders).to(torch.int64)
    dist.all_reduce(differs, op=dist.ReduceOp.MAX, group=group.handle)
    if differs.item():
        raise ValueError("the base built empty on a client group's non-leader has other tensors than the leader's "
                         "(names, shapes or dtypes): set federation.fsdp_load=every_rank")


@torch.no_grad()
def fill_from_leader_(model: torch.nn.Module, keep: set, group: ClientGroup, device: torch.device) -> None:
    """The leader (its model whole, not yet sharded) sends, the others (sharded by FSDP, with
    uninitialised storage) receive, one tensor at a time: each base parameter's dim-0 chunks
    are scattered (FSDP2's Shard(0): torch.chunk into G parts, the last ones possibly short or
    empty), so a rank receives only its own shard; the parameters in `keep` (the adapter,
    left whole by FSDP) and the buffers are broadcast whole."""
    from torch.distributed.tensor import DTensor, Shard

    check_same_structure(model, group, device)
    params = list(model.named_parameters(remove_duplicate=False))
    for name, tensor in [(n, p) for n, p in params if p not in keep]:
        if not group.leader and not (isinstance(tensor, DTensor) and tuple(tensor.placements) == (Shard(0),)):
            raise ValueError(f"{name}: FSDP did not shard it on dim 0 ({type(tensor).__name__}); cannot fill it from the leader")
        rows = -(-tensor.shape[0] // group.size)  # the longest chunk
        piece = torch.empty((rows, *tensor.shape[1:]), dtype=tensor.dtype, device=device)
        pieces = None
        if group.leader:
            padded = torch.zeros((rows * group.size, *tensor.shape[1:]), dtype=tensor.dtype, device=device)
            padded[: tensor.shape[0]] = tensor
            pieces = list(padded.chunk(group.size))
        dist.scatter(piece, pieces, group=group.handle, group_src=0)
        if not group.leader:
            local = tensor.to_local()
            local.copy_(piece[: local.shape[0]])
    for name, tensor in [*((n, p) for n, p in params if p in keep), *model.named_buffers(remove_duplicate=False)]:
        sent = tensor.detach().to(device) if group.leader else torch.empty_like(tensor, device=device)
        dist.broadcast(sent, group=group.handle, group_src=0)
        if group.leader:
            tensor.data = sent  # on the device (the leader built its model on the CPU)
        else:
            tensor.copy_(sent)


def group_mean_(tensors: list[torch.Tensor], group: ClientGroup, device: torch.device) -> None:
    """Each tensor, in place, becomes its mean over the ranks of `group` (one flat all-reduce)."""
    if group.size == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1).to(device, torch.float32) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group.handle)
    flat /= group.size
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].reshape(t.shape))
        offset += t.numel()


def group_sum_(tensors: list[torch.Tensor], group: ClientGroup, device: torch.device) -> None:
    """Each tensor, in place, becomes its sum over the ranks of `group` (one flat all-reduce)."""
    if group.size == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1).to(device, torch.float32) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group.handle)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].reshape(t.shape))
        offset += t.numel()


def all_gather_rows(rows: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Concatenates every rank's [n_r, c] float64 rows (n_r may differ), in rank order."""
    if not is_distributed():
        return rows
    count = torch.tensor([rows.shape[0]], dtype=torch.int64, device=device)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    most = max(int(c.item()) for c in counts)
    padded = torch.zeros(most, rows.shape[1], dtype=rows.dtype, device=device)
    padded[: rows.shape[0]] = rows.to(device)
    gathered = [torch.zeros_like(padded) for _ in counts]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(c.item())] for g, c in zip(gathered, counts)]).cpu()


def broadcast_int(value: int, device: torch.device) -> int:
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    return int(t.item())


def broadcast_state_(state: dict, device: torch.device) -> dict:
    """Rank 0's tensors, in place, on every rank (key by key, in sorted order)."""
    if is_distributed():
        for key in sorted(state):
            on_device = state[key].to(device)
            dist.broadcast(on_device, src=0)
            state[key].copy_(on_device.to(state[key].device))
    return state


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def canonical_shapes(template: dict) -> dict:
    """Key -> shape in sorted key order: dicts read back from safetensors come in no fixed
    order, and ranks exchange flat buffers element by element."""
    return {k: template[k].shape for k in sorted(template)}


def pack(state: dict, shapes: dict) -> torch.Tensor:
    """The tensors of `state`, in the order of `shapes`, as one flat float64 CPU vector."""
    return torch.cat([state[k].reshape(-1).to("cpu", torch.float64) for k in shapes])


def slices(shapes: dict):
    """(key, shape, where in the flat buffer) in the order of `shapes`."""
    offset = 0
    for key, shape in shapes.items():
        yield key, shape, slice(offset, offset + shape.numel())
        offset += shape.numel()


def unpack(flat: torch.Tensor, shapes: dict) -> dict:
    return {key: flat[where].to(torch.float32).reshape(shape) for key, shape, where in slices(shapes)}


def all_gather_messages(kept: list[tuple[int, dict, float]], template: dict, device) -> list[tuple[int, dict, float]]:
    """Every rank's (client_id, message, weight) triples, on every rank, ordered by client id
    (so robust rules see the same list whatever the number of ranks)."""
    if is_distributed():
        shapes = canonical_shapes(template)
        width = 2 + sum(shape.numel() for shape in shapes.values())
        rows = torch.stack([
            torch.cat([torch.tensor([cid, w], dtype=torch.float64), pack(m, shapes)]) for cid, m, w in kept
        ]) if kept else torch.zeros(0, width, dtype=torch.float64)
        kept = [(int(row[0]), unpack(row[2:], shapes), float(row[1])) for row in all_gather_rows(rows, device)]
    return sorted(kept, key=lambda item: item[0])


class Reducer:
    """The collectives, handed to code that must not call torch.distributed itself (an
    adapter's collector): sums and gathers over every rank, no-ops in one process.
    `contributes=False` (a client group's non-leader, which holds a copy of what its leader
    holds): this rank takes part in every collective but adds nothing, so a group counts once."""

    def __init__(self, device: torch.device, contributes: bool = True):
        self.device, self.contributes = device, contributes

    @property
    def active(self) -> bool:
        return is_distributed()

    def sum_(self, flat: torch.Tensor) -> torch.Tensor:
        if not self.contributes:
            flat.zero_()
        return all_reduce_sum_(flat, self.device)

    def gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return all_gather_rows(rows if self.contributes else rows[:0], self.device)

    def gather_messages(self, kept: list[tuple[int, dict, float]], template: dict) -> list[tuple[int, dict, float]]:
        return all_gather_messages(kept if self.contributes else [], template, self.device)


def gather_trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors of a model sharded by FSDP (FSDP2 `fully_shard` or FSDP1), whole,
    on every rank, keyed by their unwrapped names (collective: every rank of the shards calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, ignore_frozen_params=True))
    return {k: t.detach().cpu().clone() for k, t in full.items()}


def scatter_trainable_(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Writes whole trainable tensors (the same on every rank) into each rank's shards (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    # a copy: torch replaces the dict's entries by the distributed tensors it makes of them
    set_model_state_dict(model, dict(state), options=StateDictOptions(full_state_dict=True, strict=False))

"""The few torch.distributed collectives the engine needs (gloo on CPU, nccl on GPU).
Tensors only: nothing is pickled between processes."""
from __future__ import annotations

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


def all_reduce_sum_(flat: torch.Tensor, device: torch.device) -> torch.Tensor:
    if is_distributed():
        on_device = flat.to(device)
        dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
        flat.copy_(on_device.to(flat.device))
    return flat


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
    adapter's collector): sums and gathers over every rank, no-ops in one process."""

    def __init__(self, device: torch.device):
        self.device = device

    @property
    def active(self) -> bool:
        return is_distributed()

    def sum_(self, flat: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum_(flat, self.device)

    def gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return all_gather_rows(rows, self.device)

    def gather_messages(self, kept: list[tuple[int, dict, float]], template: dict) -> list[tuple[int, dict, float]]:
        return all_gather_messages(kept, template, self.device)

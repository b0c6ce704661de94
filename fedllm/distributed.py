"""The few torch.distributed collectives the engine needs (gloo on CPU, nccl on GPU).
Tensors only: nothing is pickled between processes."""
from __future__ import annotations

import torch
import torch.distributed as dist
from accelerate import PartialState


def process_state() -> PartialState:
    # A bare PartialState() under torchrun on a CPU-only machine is not distributed: ask for
    # the CPU (gloo) state explicitly when there is no CUDA.
    return PartialState(cpu=not torch.cuda.is_available())


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


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_messages(kept: list[tuple[int, dict, float]], template: dict, device) -> list[tuple[int, dict, float]]:
    """Every rank's (client_id, message, weight) triples, on every rank, ordered by client id
    (so robust rules see the same list whatever the number of ranks)."""
    keys = sorted(template)
    if is_distributed():
        rows = torch.stack([
            torch.cat([torch.tensor([cid, w], dtype=torch.float64)] + [m[k].reshape(-1).double().cpu() for k in keys])
            for cid, m, w in kept
        ]) if kept else torch.zeros(0, 2 + sum(template[k].numel() for k in keys), dtype=torch.float64)
        kept = []
        for row in all_gather_rows(rows, device):
            message, offset = {}, 2
            for k in keys:
                n = template[k].numel()
                message[k] = row[offset : offset + n].float().reshape(template[k].shape)
                offset += n
            kept.append((int(row[0]), message, float(row[1])))
    return sorted(kept, key=lambda item: item[0])

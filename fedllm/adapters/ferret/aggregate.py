"""Ferret's aggregation in coordinate space (arXiv 2409.06277 §3.2; the official server's
`aggregate_seed_pool` + `update_global_model_by_seed_pool`). Reconstruction is linear in the
coordinates, so the server sums the clients' weighted coordinates per (seed, block) and
rebuilds the mean update once per round: each basis is generated once per round, no
client's full-size update is ever materialised, and the mean is applied in place to the
global state block by block. The same compact message is the download: every client
applies it to its own copy of x^t to get x^{t+1} (so the server and the clients hold
bit-identical weights), and a client that missed rounds applies each missed one in turn."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fedllm.distributed import all_gather_rows, all_reduce_sum_, is_distributed
from fedllm.wire import Message, WireContext

if TYPE_CHECKING:
    from fedllm.adapters.ferret.adapter import Ferret

LOW32 = 2**32


class CoordinateSum:
    """Σ_i w_i·γ_i per seed pool (one pool when the seeds are shared, one per client when
    each client draws its own), in float64, dense over the K_g slots of every block."""

    def __init__(self, adapter: "Ferret", ctx: WireContext):
        self.adapter, self.ctx = adapter, ctx
        self.width = sum(adapter.ks)
        self.shared = adapter.seed_pool != "per_client"
        self.entries: dict[int, tuple[list[int], torch.Tensor]] = {}
        if self.shared:  # every rank holds the (possibly empty) sum of the one pool
            self.entries[0] = (adapter.pool(ctx), torch.zeros(self.width, dtype=torch.float64))
        self.weight = 0.0

    def add(self, tensors: dict[str, torch.Tensor], weight: float, ctx: WireContext) -> None:
        """Adds one client's wire message (after the codecs), weighted."""
        seeds, dense = self.adapter.dense_coordinates(tensors, ctx)
        key = 0 if self.shared else ctx.client_id
        if key in self.entries:
            self.entries[key][1].add_(dense, alpha=weight)
        else:
            self.entries[key] = (seeds, dense.mul_(weight))
        self.weight += weight

    def all_reduce(self, device) -> None:
        """Every rank ends with the sum over all ranks' clients (tensors only)."""
        if not is_distributed():
            return
        total = torch.tensor([self.weight], dtype=torch.float64)
        self.weight = float(all_reduce_sum_(total, device)[0])
        if self.shared:
            all_reduce_sum_(self.entries[0][1], device)
            return
        k = max(self.adapter.ks)
        rows = [
            torch.cat([torch.tensor([key], dtype=torch.float64), split_seeds(seeds), dense])
            for key, (seeds, dense) in self.entries.items()
        ]
        table = torch.stack(rows) if rows else torch.zeros(0, 1 + 2 * k + self.width, dtype=torch.float64)
        self.entries = {
            int(row[0]): (join_seeds(row[1 : 1 + 2 * k]), row[1 + 2 * k :].clone()) for row in all_gather_rows(table, device)
        }

    def message(self) -> Message:
        """The round's aggregate as a download: mean coordinates (fp32) and, for per-client
        pools, the seeds they belong to, in client order (the same on every rank)."""
        keys = sorted(self.entries)
        coords = torch.stack([self.entries[key][1] / self.weight for key in keys]).float()
        tensors = {"coords": coords}
        if not self.shared:
            tensors["seeds"] = torch.tensor([self.entries[key][0] for key in keys], dtype=torch.int64)
        return Message(tensors, {"round": str(self.ctx.round)})


def split_seeds(seeds: list[int]) -> torch.Tensor:
    # 63-bit seeds as two exact float64 halves, so they travel in the same float64 gather
    return torch.tensor([x for s in seeds for x in divmod(s, LOW32)], dtype=torch.float64)


def join_seeds(halves: torch.Tensor) -> list[int]:
    values = [int(v) for v in halves.tolist()]
    return [hi * LOW32 + lo for hi, lo in zip(values[0::2], values[1::2])]

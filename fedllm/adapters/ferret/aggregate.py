"""Ferret's aggregation in coordinate space (arXiv 2409.06277 §3.2; the official server's
`aggregate_seed_pool` + `update_global_model_by_seed_pool`). Reconstruction is linear in the
coordinates, so the server sums the clients' weighted coordinates per (seed, block) and
rebuilds the mean update once per round: each basis is generated once per round, no
client's full-size update is ever materialised, and the mean is applied in place to the
global state block by block. The same compact message is the download: every client
applies it to its own copy of x^t to get x^{t+1} (so the server and the clients hold
bit-identical weights), and a client that missed rounds applies each missed one in turn."""
from __future__ import annotations

from typing import Callable

import torch

from fedllm.distributed import Reducer
from fedllm.state import State, is_finite
from fedllm.strategies.base import RoundInfo, Strategy
from fedllm.wire import Message, WireContext, serialized_size

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

    def all_reduce(self, reducer: Reducer) -> None:
        """Every rank ends with the sum over all ranks' clients (tensors only)."""
        if not reducer.active:
            return
        total = torch.tensor([self.weight], dtype=torch.float64)
        self.weight = float(reducer.sum_(total)[0])
        if self.shared:
            reducer.sum_(self.entries[0][1])
            return
        k = max(self.adapter.ks)
        rows = [
            torch.cat([torch.tensor([key], dtype=torch.float64), split_seeds(seeds), dense])
            for key, (seeds, dense) in self.entries.items()
        ]
        table = torch.stack(rows) if rows else torch.zeros(0, 1 + 2 * k + self.width, dtype=torch.float64)
        self.entries = {
            int(row[0]): (join_seeds(row[1 : 1 + 2 * k]), row[1 + 2 * k :].clone()) for row in reducer.gather_rows(table)
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


class CoordinateMean:
    """The round's collector: sums the clients' wire coordinates; at the end the round's
    compact aggregate is the download message, and the server applies it to x^t in place
    exactly as each client will (one reconstruction per round). The strategy is a plain
    mean (Strategy.needs == "plain_mean"), so it has nothing to add."""

    def __init__(self, rounds: "CompactRounds", round: int):
        self.rounds, self.ctx = rounds, WireContext(round, -1, rounds.seed)
        self.coords = rounds.adapter.coordinate_sum(self.ctx)

    def add(self, client_id: int, message: State, weight: float) -> bool:
        if not is_finite(message):
            return False
        try:  # an untrusted message that does not fit the block map is rejected, not summed
            self.coords.add(message, weight, WireContext(self.ctx.round, client_id, self.ctx.seed))
        except (ValueError, KeyError, IndexError, RuntimeError):
            return False
        return True

    def finish(self, strategy: Strategy, global_state: State, server_state: State, info: Callable[[float], RoundInfo],
               reducer: Reducer) -> tuple[State, State]:
        self.coords.all_reduce(reducer)
        download = self.coords.message()
        self.rounds.adapter.apply_broadcast(download, global_state, self.ctx)
        self.rounds.sizes.append(serialized_size(download))
        return global_state, server_state

    def unchanged(self) -> None:
        self.rounds.sizes.append(0)  # nothing to download for this round


class CompactRounds:
    """Ferret's side of the protocol across rounds: each round's collector, and what a
    client downloads to hold x^t — the aggregate of every round since it last took part
    (it then held that round's x; a new client holds x^0, the base weights), or the full
    state when that is smaller. The per-round sizes are checkpointed (`state`)."""

    def __init__(self, adapter: "Ferret", seed: int):
        self.adapter, self.seed = adapter, seed
        self.sizes: list[int] = []  # serialized size of each round's compact aggregate
        self._full_state_bytes: int | None = None

    def collector(self, round: int) -> CoordinateMean:
        return CoordinateMean(self, round)

    def download_bytes(self, round: int, last_taken: int, global_state: State, client_id: int) -> int:
        """`last_taken`: the last round < `round` in which the client was sampled (0: none)."""
        missed = sum(self.sizes[last_taken:round])
        return min(missed, self.full_state_bytes(global_state)) if missed else 0

    def full_state_bytes(self, global_state: State) -> int:
        if self._full_state_bytes is None:
            self._full_state_bytes = serialized_size(self.adapter.encode_global(global_state))
        return self._full_state_bytes

    def state(self) -> State:
        return {"broadcast_sizes": torch.tensor(self.sizes, dtype=torch.int64)}

    def load_state(self, state: State) -> None:
        self.sizes = state.get("broadcast_sizes", torch.zeros(0, dtype=torch.int64)).tolist()

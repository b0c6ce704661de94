"""LoRA with a rank per client (by device tier, or listed per client) under one global
adapter of rank r = the largest. A client of rank r_c trains the first r_c components at
peft's scale α/r_c; the resident model emulates it at rank r with the other components at
zero (their gradients are then exactly zero, so they stay zero) and its scaling set to α/r_c.
Only the r_c components travel up. Units: the global state is a rank-r LoRA at scale α/r;
a client's factors are A_c = A[:r_c], B_c = (r_c/r)·B[:, :r_c], so that
(α/r_c)·B_c·A_c = (α/r)·B[:, :r_c]·A[:r_c] — the scale trap of mixing ranks, handled here.

Aggregation (`aggregation:`):
- zero_pad (HetLoRA, Cho et al. 2024, §3 "zero-padding"): each Δ is padded to rank r, its B
  part rescaled by r/r_c into global units, and the strategy averages them as usual.
- flexlora (Bai et al. 2024, Eq. 2–4): the server forms each client's full product
  ΔW_c = (α/r_c)·B_c·A_c, averages W̄ = Σ p_c ΔW_c, and stores its truncated SVD at rank r
  (A = V_rᵀ, B = U_r·S_r·r/α; `flexlora_split: balanced`: A = S_r^½·V_rᵀ, B = U_r·S_r^½·r/α);
  a client of rank r_c then receives the best rank-r_c approximation of W̄ (Eckart–Young),
  at its own scale. Averaging the products loses, every
  round, the global's components a client could not hold: component j of the global survives
  with the weight share of the clients of rank >= j. `flexlora_mean: changes` averages each
  client's change from the truncation it started from instead, added to the whole global
  (not the paper's rule; it keeps what low-rank clients never saw)."""
from __future__ import annotations

import logging
from typing import Callable, Literal

import torch
from peft.tuners.lora import LoraLayer

from fedllm.adapters.lora import LoRA
from fedllm.distributed import Reducer
from fedllm.registry import ADAPTERS, RecipeError
from fedllm.state import State, is_finite
from fedllm.strategies.base import PLAIN_MEAN, RoundInfo, Strategy
from fedllm.wire import MalformedMessage, Message, WireContext, serialized_size

A_KEY, B_KEY = ".lora_A.", ".lora_B."
log = logging.getLogger("fedllm")


@ADAPTERS.register("hetero_lora")
class HeteroLoRA(LoRA):
    """LoRA of a rank per client (rank_by_tier: one rank per device tier, slowest first; or ranks: client i gets ranks[i % len]); zero_pad or flexlora aggregation; flexlora_mean: products (the paper's) or changes (each client's change from its own truncated start, added to the whole global); flexlora_split: b (B = U·S, A = Vᵀ) or balanced (S^½ on each side)."""

    def __init__(
        self,
        r: int = 16,
        alpha: float = 32.0,
        dropout: float = 0.05,
        target_modules: list[str] | str | None = None,
        rank_by_tier: list[int] | None = None,
        ranks: list[int] | None = None,
        aggregation: Literal["zero_pad", "flexlora"] = "flexlora",
        flexlora_mean: Literal["products", "changes"] = "products",
        flexlora_split: Literal["b", "balanced"] = "b",
    ):
        super().__init__(r, alpha, dropout, target_modules, "none")
        if (rank_by_tier is None) == (ranks is None):
            raise RecipeError("hetero_lora needs exactly one of adapter.rank_by_tier (one rank per device tier) and "
                              "adapter.ranks (one rank per client)")
        listed = rank_by_tier if rank_by_tier is not None else ranks
        if not listed or any(not 1 <= k <= r for k in listed):
            raise RecipeError(f"hetero_lora ranks must lie in 1..adapter.r={r} (got {listed})")
        self.rank_by_tier, self.ranks, self.aggregation_name = rank_by_tier, ranks, aggregation
        self.flexlora_mean, self.flexlora_split = flexlora_mean, flexlora_split
        self.client_ranks: list[int] = []
        self.layers: list[LoraLayer] = []
        self.shapes: dict[str, torch.Size] = {}  # the global tensors' shapes: what a message may carry

    def attach(self, model, seed):
        model = super().attach(model, seed)
        self.layers = [m for m in model.modules() if isinstance(m, LoraLayer) and "default" in m.scaling]
        self.shapes = {name: p.shape for name, p in self.trainable(model).items()}
        return model

    def assign_tiers(self, tiers: Callable[[int], list[int]] | None, num_clients: int) -> None:
        if self.ranks is not None:
            return
        if tiers is None:
            raise RecipeError("adapter.rank_by_tier needs federation.devices (tiers rank the clients by speed), "
                              "or give adapter.ranks per client")
        self.client_ranks = [self.rank_by_tier[tier] for tier in tiers(len(self.rank_by_tier))]

    def rank_of(self, client_id: int) -> int:
        if self.ranks is not None and client_id >= 0:
            return self.ranks[client_id % len(self.ranks)]
        if not 0 <= client_id < len(self.client_ranks):
            raise MalformedMessage(f"hetero_lora: no rank known for client {client_id}")
        return self.client_ranks[client_id]

    def set_scale(self, rank: int) -> None:
        for layer in self.layers:
            layer.scaling["default"] = self.alpha / rank

    # ---- a client's view ----------------------------------------------------------------
    def load(self, model, state, params=None):
        self.set_scale(self.r)  # the global adapter (evaluation, export)
        super().load(model, state, params)

    def for_client(self, model, params, x_t: State, client_id: int) -> State:
        rank = self.rank_of(client_id)
        x_c = self.truncate(x_t, rank)
        super().load(model, x_c, params)
        self.set_scale(rank)
        return x_c

    def truncate(self, state: State, rank: int) -> State:
        """The global state as a rank-`rank` client holds it, zero-padded to rank r."""
        out = {}
        for key, t in state.items():
            t = t.clone()
            if A_KEY in key:
                t[rank:] = 0
            elif B_KEY in key:
                t[:, rank:] = 0
                t[:, :rank] *= rank / self.r
            out[key] = t
        return out

    def client_download(self, state: State, client_id: int) -> State:
        """A rank-r_c client receives only its factors: A[:r_c] and (r_c/r)·B[:, :r_c]."""
        rank = self.rank_of(client_id)
        return {k: t[:rank] if A_KEY in k else t[:, :rank] * (rank / self.r) if B_KEY in k else t
                for k, t in state.items()}

    # ---- the wire -----------------------------------------------------------------------
    def encode(self, update, ctx: WireContext) -> Message:
        rank = self.rank_of(ctx.client_id)
        out = {}
        for key in update:
            t = update[key]
            out[key] = t[:rank].contiguous() if A_KEY in key else t[:, :rank].contiguous() if B_KEY in key else t
        return Message(out)

    def decode(self, message: Message, ctx: WireContext) -> State:
        """zero_pad: the client's Δ in global units, padded to rank r."""
        rank = self.rank_of(ctx.client_id)
        out = {}
        for key, t in message.tensors.items():
            if A_KEY in key:
                check_rank(key, t.shape[0] if t.dim() == 2 else -1, rank)
                t = torch.cat([t, t.new_zeros(self.r - rank, t.shape[1])])
            elif B_KEY in key:
                check_rank(key, t.shape[1] if t.dim() == 2 else -1, rank)
                t = torch.cat([t * (self.r / rank), t.new_zeros(t.shape[0], self.r - rank)], dim=1)
            out[key] = t
        return out

    def aggregation(self, strategy: Strategy, seed: int):
        if self.aggregation_name != "flexlora":
            return None
        if strategy.needs != PLAIN_MEAN:
            raise RecipeError("hetero_lora aggregation=flexlora replaces the mean by an SVD of the averaged products: "
                              "use strategy fedavg with server_lr 1, or aggregation=zero_pad")
        return FlexRounds(self)

    def client_shape(self, key: str, client_id: int) -> tuple[int, int]:
        """The shape of a tensor of `client_id`'s upload (its rank's rows of A, columns of B)."""
        rows, cols = self.shapes[key]
        rank = self.rank_of(client_id)
        return (rank, cols) if A_KEY in key else (rows, rank)

    def best_approximation(self, mean_product: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A, B) of the rank-r global adapter whose (α/r)·B·A is the truncated SVD of W̄, and
        the energy the truncation drops (Σ of the dropped squared singular values)."""
        u, s, vh = torch.linalg.svd(mean_product, full_matrices=False)
        left, right = (s[: self.r], torch.ones_like(s[: self.r])) if self.flexlora_split == "b" else (s[: self.r].sqrt(),) * 2
        a = vh[: self.r] * right[:, None]
        return a.contiguous(), (u[:, : self.r] * left) * (self.r / self.alpha), s[self.r:].square().sum()


def report_energy(round: int, global_energy: float, started: float, dropped: float) -> None:
    """Where FlexLoRA loses the global ΔW (bench/async_rounds.py reads this line): the share of
    its energy the clients' truncated starts kept, and the share of W̄'s the SVD dropped."""
    log.info("flexlora round %d: truncated starts kept %.4f of the global's energy; the SVD dropped %.4f",
             round, started / global_energy if global_energy else 1.0, dropped / global_energy if global_energy else 0.0)


def check_rank(key: str, got: int, rank: int) -> None:
    if got != rank:
        raise MalformedMessage(f"hetero_lora: {key} carries rank {got}, the client's rank is {rank}")


class FlexCollector:
    """A round of FlexLoRA: keeps the (small) low-rank messages; at the end forms W̄ module by
    module from the clients' full factors (their start, known to the server, plus Δ)."""

    def __init__(self, adapter: HeteroLoRA, round: int = 0):
        self.adapter, self.kept, self.round = adapter, [], round
        self.energy: list[float] = []

    def add(self, client_id: int, message: State, weight: float) -> bool:
        if message.keys() != self.adapter.shapes.keys() or not all(
                t.shape == self.adapter.client_shape(key, client_id) for key, t in message.items()):
            return False
        if not is_finite(message):
            return False
        self.kept.append((client_id, message, weight))
        return True

    def finish(self, strategy: Strategy, global_state: State, server_state: State, info: Callable[[float], RoundInfo],
               reducer: Reducer) -> tuple[State, State]:
        a, r = self.adapter, self.adapter.r
        weight = reducer.sum_(torch.tensor([sum(w for _, _, w in self.kept)], dtype=torch.float64))[0]
        new = dict(global_state)
        energy = torch.zeros(3, dtype=torch.float64)  # ‖global‖², ‖its part the clients started from‖², dropped by the SVD
        for key in (k for k in global_state if A_KEY in k):
            b_key = key.replace(A_KEY, B_KEY)
            A, B = global_state[key].double().cpu(), global_state[b_key].double().cpu()
            total = torch.zeros(B.shape[0], A.shape[1], dtype=torch.float64)
            started = torch.zeros_like(total)
            for client_id, message, w in self.kept:
                k = a.rank_of(client_id)
                a_c = A[:k] + message[key].double()
                b_c = B[:, :k] * (k / r) + message[b_key].double()
                total += (w * a.alpha / k) * (b_c @ a_c)  # ΔW_c at the client's own scale α/r_c
                started += (w * a.alpha / r) * (B[:, :k] @ A[:k])  # the truncation it started from
            if a.flexlora_mean == "changes":  # each client's change from its own start, added to the whole global
                total += weight * (a.alpha / r) * (B @ A) - started
            mean = reducer.sum_(total.reshape(-1)).reshape(total.shape) / weight
            new_a, new_b, dropped = a.best_approximation(mean)
            energy += torch.stack([((a.alpha / r) * (B @ A)).square().sum(), (started / weight).square().sum(), dropped])
            new[key] = new_a.to(global_state[key].dtype).to(global_state[key].device)
            new[b_key] = new_b.to(global_state[b_key].dtype).to(global_state[b_key].device)
        self.energy = energy.tolist()
        report_energy(self.round + 1, *self.energy)
        return new, server_state

    def unchanged(self) -> None:
        pass


class FlexRounds:
    """FlexLoRA's side of the protocol across rounds (nothing to checkpoint beyond the global)."""

    def __init__(self, adapter: HeteroLoRA):
        self.adapter = adapter

    def collector(self, round: int) -> FlexCollector:
        return FlexCollector(self.adapter, round)

    def download_bytes(self, round: int, last_taken: int, global_state: State, client_id: int) -> int:
        return serialized_size(self.adapter.encode_global(self.adapter.client_download(global_state, client_id)))

    def state(self) -> State:
        return {}

    def load_state(self, state: State) -> None:
        pass

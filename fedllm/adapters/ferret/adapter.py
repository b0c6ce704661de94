"""Ferret — Shu et al., ICML 2025 (arXiv 2409.06277; official code allen4747/Ferret):
federated full-parameter tuning through shared randomness. Clients train the base weights
with first-order steps; the update Δ = w_start − w_end is cut into blocks and each block is
sent as K coordinates on bases that every party regenerates from seeds (§3.2); the server
rebuilds Σ_k γ_k v_k per block and averages.

Two scalings (`scaling`):
- `unbiased` (the paper's estimator): γ_k = ⟨Δ_g, v_k⟩ / (K_g·σ²_g), σ²_g the variance of
  the truncated normal (≈ 1/(3 d_g)), so E[Σ γ_k v_k] = Δ_g. Server lr 1, no clipping.
- `official` (what produced the reported numbers): a norm-adaptive budget of
  M_g = max(⌊‖Δ_g‖/max‖Δ‖·K⌋, 2) seeds out of K per block, γ_k = (d_g/M_g)·⟨Δ_g, v_k⟩ (so
  E = d_g·σ²_g·Δ_g ≈ Δ_g/3), every (seed, block) term clipped to norm 10 and applied with
  server lr 10. As in the code (`aggregate_seed_pool`), the clip applies to the clients'
  weighted-mean term per seed on the engine's compact path; where the engine decodes every
  client (a strategy other than plain FedAvg/FedProx, robust rules) it clips each client's.
Aggregation (ferret_aggregate.CoordinateSum): with FedAvg/FedProx at server lr 1 the engine
sums the clients' coordinates per (seed, block), rebuilds the mean once per round and adds
it to x^t in place; that round's aggregate (seeds + mean coordinates) is also the download,
which each client applies to its own copy (the paper's protocol), so nobody ships weights.
Seeds (`seed_pool`): the paper's clients draw their own K seeds and send them
(`per_client`); the code shares one pool of K seeds for the whole run (`shared`, nothing
sent but seed indices); `per_round` shares a fresh pool per round.

`server_lr` lives here, in `decode`: keep the strategy's own server_lr at 1 (fedavg).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, replace
from typing import Literal, Optional

import numpy as np
import torch

from fedllm.adapters.ferret.aggregate import CompactRounds, CoordinateSum
from fedllm.adapters.ferret.projections import Bases
from fedllm.adapters.full import FullParameters
from fedllm.codecs.seeded import generate, truncated_normal_variance, truncation
from fedllm.registry import ADAPTERS, RecipeError
from fedllm.seeds import derive
from fedllm.strategies.base import PLAIN_MEAN, Strategy
from fedllm.wire import Message, WireContext

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Block:
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def size(self) -> int:
        return sum(math.prod(s) for s in self.shapes)


def make_blocks(params: list[tuple[str, tuple[int, ...]]], rule: str) -> list[Block]:
    """The block map, a pure function of the trainable (name, shape) list in model order —
    part of the protocol, identical on every party."""
    if rule == "single":
        groups = [params]
    elif rule == "per_tensor":
        groups = [[p] for p in params]
    else:
        groups = merge_small(params)
    return [Block(tuple(n for n, _ in g), tuple(tuple(s) for _, s in g)) for g in groups]


def merge_small(params: list[tuple[str, tuple[int, ...]]]) -> list[list]:
    # the official `_group_parameters`: consecutive tensors fill a block up to 0.9 × the median
    # tensor size, so every large matrix is its own block and runs of small ones are merged
    target = int(0.9 * np.median([math.prod(s) for _, s in params]))
    groups, current, filled = [], [], 0
    for name, shape in params:
        if current and filled + math.prod(shape) > target:
            groups.append(current)
            current, filled = [], 0
        current.append((name, shape))
        filled += math.prod(shape)
    return groups + [current] if current else groups


def split_k(k: int, sizes: list[int], per: str) -> list[int]:
    """K_g per block: `k` each, or `k` in total shared ∝ block size (largest remainder, ≥ 1)."""
    if per == "block":
        return [k] * len(sizes)
    if k < len(sizes):
        raise RecipeError(f"adapter.k={k} in total is fewer than the {len(sizes)} blocks; raise k or use k_per=block")
    shares = [(k - len(sizes)) * s / sum(sizes) for s in sizes]
    ks = [1 + int(x) for x in shares]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (int(shares[i]) - shares[i], i))
    for i in by_remainder[: k - sum(ks)]:
        ks[i] += 1
    return ks


def official_budget(norms: list[float], ks: list[int]) -> list[int]:
    """M_g = max(⌊‖Δ_g‖ / max_g ‖Δ_g‖ · K_g⌋, 2), at most K_g (official `project_update`)."""
    top = max([n for n in norms if math.isfinite(n)] + [1e-8])
    return [min(k, max(int(n / top * k), 2) if math.isfinite(n) else 2) for n, k in zip(norms, ks)]


def block_norm(update: dict[str, torch.Tensor], block: Block) -> float:
    return math.sqrt(sum(float(torch.linalg.vector_norm(update[n].float())) ** 2 for n in block.names))


def flatten(update: dict[str, torch.Tensor], block: Block) -> torch.Tensor:
    if len(block.names) == 1:
        return update[block.names[0]].reshape(-1)  # a view: no copy of a large matrix
    return torch.cat([update[n].reshape(-1) for n in block.names])


def unflatten(flat: torch.Tensor, block: Block) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for name, shape in zip(block.names, block.shapes):
        n = math.prod(shape)
        out[name] = flat[offset : offset + n].view(shape)
        offset += n
    return out


@ADAPTERS.register("ferret")
class Ferret(FullParameters):
    """Ferret: full-parameter local training; the update travels as K seeded-projection
    coordinates per block and is rebuilt from regenerated bases (arXiv 2409.06277)."""

    plain_wire = False  # its update travels as projections
    trains_through_offload = False  # full-parameter, bases generated on the first weight's device

    def __init__(
        self,
        k: int = 200,
        k_per: Literal["block", "total"] = "block",
        block_rule: Literal["merge_small", "per_tensor", "single"] = "merge_small",
        scaling: Literal["unbiased", "official"] = "unbiased",
        server_lr: Optional[float] = None,  # None: 1 (unbiased) or 10 (the official slr)
        clip: Optional[float] = None,  # norm cap of each (seed, block) term; None: off (unbiased) or 10 (official)
        seed_pool: Literal["per_client", "per_round", "shared"] = "per_client",
        orthogonalize: bool = False,  # Gram–Schmidt the K bases of a block (exact once K ≥ d)
        trainable: str = "all",
        dtype: Literal["float32", "float64", "bfloat16"] = "float32",  # projection arithmetic
        generator_device: Literal["auto", "cpu"] = "auto",  # auto: the model's device
        cache_mb: float = 256.0,  # bases kept between encode and decode (and across clients)
    ):
        super().__init__(trainable)
        if k <= 0:
            raise RecipeError("adapter.k must be positive")
        self.k, self.k_per, self.block_rule, self.scaling = k, k_per, block_rule, scaling
        official = scaling == "official"
        self.server_lr = server_lr if server_lr is not None else (10.0 if official else 1.0)
        self.clip = clip if clip is not None else (10.0 if official else None)
        self.seed_pool, self.orthogonalize, self.generator_device = seed_pool, orthogonalize, generator_device
        self.dtype, self.cache_bytes = DTYPES[dtype], int(cache_mb * 2**20)
        self.blocks: list[Block] = []
        self.bases = Bases("cpu", self.dtype, self.cache_bytes)

    # ---- the protocol's shared facts -------------------------------------------------
    def attach(self, model, seed):
        model = super().attach(model, seed)
        params = [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad]
        self.blocks = make_blocks(params, self.block_rule)
        self.ks = split_k(self.k, [b.size for b in self.blocks], self.k_per)
        self.follow(model)
        return model

    def follow(self, model) -> None:
        """Generates bases on the model's device (`auto`) or always on the CPU."""
        device = next(model.parameters()).device if self.generator_device == "auto" else torch.device("cpu")
        if device != self.bases.device:
            self.bases = Bases(device, self.dtype, self.cache_bytes)

    def prepare_local_round(self, model):
        self.follow(model)

    def pool(self, ctx: WireContext) -> list[int]:
        """The K seeds: drawn per client per round (the paper), per round, or once per run
        (the code's candidate pool); all derived from the recipe seed, never the global RNG."""
        state = derive(ctx.seed, *self.scope(ctx), tag="ferret-pool").generate_state(max(self.ks), np.uint64)
        return [int(s >> np.uint64(1)) for s in state]  # 63 bits: fits int64 on the wire

    def scope(self, ctx: WireContext) -> tuple:
        # the bases stay valid as long as the seed set does
        return {"per_client": (ctx.round, ctx.client_id), "per_round": (ctx.round,), "shared": ()}[self.seed_pool]

    def chosen(self, ctx: WireContext, g: int, k: int, m: int) -> list[int]:
        if m == k:
            return list(range(k))
        rng = np.random.default_rng(derive(ctx.seed, ctx.round, ctx.client_id, g, tag="ferret-subset"))
        return sorted(rng.choice(k, m, replace=False).tolist())

    def scale(self, d: int, n: int) -> float:
        if self.orthogonalize:  # E[QᵀQ] = (n/d)·I for a random n-dim subspace; exact (1) once n ≥ d
            return d / min(n, d)
        if self.scaling == "official":
            return d / n
        return 1.0 / (n * truncated_normal_variance(truncation(d)))  # E[v vᵀ] = σ² I

    # ---- the wire --------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, update, ctx):
        pool = self.pool(ctx)
        self.bases.cache.enter(self.scope(ctx))
        official = self.scaling == "official"
        counts = official_budget([block_norm(update, b) for b in self.blocks], self.ks) if official else self.ks
        coords, index = [], []
        for g, (block, k, m) in enumerate(zip(self.blocks, self.ks, counts)):
            chosen = self.chosen(ctx, g, k, m)
            gamma = self.bases.project(flatten(update, block), [pool[i] for i in chosen], g, self.orthogonalize)
            # the engine's update is x_i − x^t; the paper's Δ = w_start − w_end is its negative
            coords.append(gamma.mul_(-self.scale(block.size, m)).cpu())
            index += chosen
        tensors = {"coords": torch.cat(coords)}
        if official:
            small = torch.int16 if self.k < 2**15 else torch.int32
            tensors["index"], tensors["counts"] = torch.tensor(index, dtype=small), torch.tensor(counts, dtype=small)
        if self.seed_pool == "per_client":
            tensors["seeds"] = torch.tensor(pool, dtype=torch.int64)
        return Message(tensors)

    @torch.no_grad()
    def decode(self, message, ctx):
        pool, counts, index, coords = self.wire_fields(message.tensors, ctx)
        self.bases.cache.enter(self.scope(ctx))
        out, offset = {}, 0
        for g, (block, m) in enumerate(zip(self.blocks, counts)):
            seeds = [pool[i] for i in index[offset : offset + m]]
            flat = self.bases.reconstruct(coords[offset : offset + m], seeds, g, block.size, self.orthogonalize, self.clip)
            offset += m
            out.update(unflatten(flat.mul_(-self.server_lr), block))  # back to x_i − x^t, times the server lr
        return out

    # ---- aggregation in coordinate space (see aggregate.py) ------------------------------
    def aggregation(self, strategy: Strategy, seed: int) -> CompactRounds | None:
        """Coordinate-space rounds under a plain-mean strategy where the pool allows it (known
        from the options alone: check_pairings asks before the adapter is attached)."""
        if strategy.needs != PLAIN_MEAN or not self.sums_coordinates:
            return None
        return CompactRounds(self, seed)

    @property
    def sums_coordinates(self) -> bool:
        """Whether reconstruction is one fixed linear map of the pool (not under official budgets
        with orthogonalised bases: the basis set depends on each client's chosen subset)."""
        return not (self.orthogonalize and self.scaling == "official")

    def coordinate_sum(self, ctx: WireContext):
        """An accumulator of the round's coordinates, or None where the pool does not allow one."""
        return CoordinateSum(self, ctx) if self.sums_coordinates else None

    def wire_fields(self, t: dict[str, torch.Tensor], ctx: WireContext) -> tuple[list[int], list[int], list[int], torch.Tensor]:
        """A wire message as (its seed pool, coordinates per block, pool index of each
        coordinate, the coordinates), checked against the block map."""
        pool = t["seeds"].tolist() if self.seed_pool == "per_client" else self.pool(ctx)
        counts = t["counts"].tolist() if "counts" in t else self.ks
        index = t["index"].tolist() if "index" in t else [i for k in self.ks for i in range(k)]
        coords = t["coords"]
        if not (len(coords) == len(index) == sum(counts)) or len(counts) != len(self.blocks):
            raise ValueError(
                f"a ferret message of {len(coords)} coordinates does not fit the block map "
                f"({len(self.blocks)} blocks, {sum(counts)} coordinates)"
            )
        return pool, counts, index, coords

    def dense_coordinates(self, tensors: dict[str, torch.Tensor], ctx: WireContext) -> tuple[list[int], torch.Tensor]:
        """A wire message as (its seed pool, float64 coordinates over all K_g slots per block;
        a seed the official budget left out holds 0, which reconstruction skips)."""
        pool, counts, index, coords = self.wire_fields(tensors, ctx)
        starts = np.cumsum([0] + self.ks[:-1])
        slots, offset = [], 0
        for g, m in enumerate(counts):
            slots += [int(starts[g]) + i for i in index[offset : offset + m]]
            offset += m
        dense = torch.zeros(sum(self.ks), dtype=torch.float64)
        dense[slots] = coords.to(torch.float64)
        return pool, dense

    @torch.no_grad()
    def apply_broadcast(self, message: Message, state: dict[str, torch.Tensor], ctx: WireContext) -> None:
        """x ← x + server_lr·(mean update), rebuilt block by block from a round's aggregate
        (CoordinateSum.message) and added in place: what the server does to x^t and what a
        client does to its own copy (the paper's broadcast of seeds and coordinates)."""
        coords = message.tensors["coords"]
        pools = message.tensors["seeds"].tolist() if "seeds" in message.tensors else [self.pool(ctx)]
        self.bases.cache.enter(self.scope(replace(ctx, client_id=-1)))  # the server's (or a client's) one scope
        offset = 0
        for g, (block, k) in enumerate(zip(self.blocks, self.ks)):
            flat = torch.zeros(block.size, dtype=torch.float32, device=self.bases.device)
            for e, pool in enumerate(pools):
                flat += self.bases.reconstruct(coords[e, offset : offset + k], pool[:k], g, block.size, self.orthogonalize, self.clip)
            offset += k
            for name, piece in unflatten(flat, block).items():
                # the engine's update is x_i − x^t, the coordinates encode its negative
                state[name].add_(piece.to(state[name].device, state[name].dtype), alpha=-self.server_lr)

    def metadata(self, model):
        self.follow(model)
        block_map = json.dumps([[list(b.names), [list(s) for s in b.shapes]] for b in self.blocks])
        probe = generate([0], 0, 1024, self.bases.device).cpu().numpy().tobytes()
        return {
            "ferret_generator_device": self.bases.device.type,
            "ferret_blocks": len(self.blocks),
            "ferret_block_sizes": [b.size for b in self.blocks],
            "ferret_k_per_block": self.ks,
            "ferret_block_map_sha256": hashlib.sha256(block_map.encode()).hexdigest(),
            "ferret_basis_probe_sha256": hashlib.sha256(probe).hexdigest(),  # basis of (seed 0, block 0, d 1024)
            "ferret_scaling": self.scaling,
            "ferret_server_lr": self.server_lr,
            "ferret_clip": self.clip,
        }

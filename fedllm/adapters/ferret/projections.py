"""Shared-randomness projections for Ferret (Shu et al., arXiv 2409.06277, §3.2): the bases
are fedllm.codecs.seeded's, which a party that knows the seeds regenerates instead of
receiving them. Coordinates γ = c·V Δ and reconstructions Σ_k γ_k v_k are computed
a chunk of bases at a time, so memory stays at one chunk whatever K is."""
from __future__ import annotations

from typing import Iterator, Sequence

import torch

from fedllm.codecs.seeded import generate

CHUNK_ELEMENTS = 2**22  # bases held at once while projecting or reconstructing (16 MiB in fp32)


def orthonormal(rows: torch.Tensor) -> torch.Tensor:
    """Orthonormal rows spanning the same space (Gram–Schmidt order: row j uses rows ≤ j);
    min(K, d) of them. With K ≥ d they span R^d and Σ⟨Δ, q_j⟩q_j = Δ exactly."""
    q, _ = torch.linalg.qr(rows.T.double(), mode="reduced")
    return q.T.to(rows.dtype)


class BasisCache:
    """Bases of the current seed set, kept up to a byte budget. It never evicts: a budget
    smaller than the working set keeps its first part instead of thrashing. `enter(scope)`
    empties it when the seed set changes (a new round, or a new client's own seeds)."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.used = max_bytes, 0
        self.scope = None
        self.rows: dict[tuple[int, int], torch.Tensor] = {}

    def enter(self, scope) -> None:
        if scope != self.scope:
            self.scope, self.rows, self.used = scope, {}, 0

    def get(self, seed: int, block: int) -> torch.Tensor | None:
        return self.rows.get((seed, block))

    def put(self, seeds: Sequence[int], block: int, rows: torch.Tensor) -> None:
        row_bytes = rows.shape[1] * rows.element_size()
        fits = min(len(seeds), (self.max_bytes - self.used) // row_bytes)
        # rows are views of one chunk: keep the views only when the whole chunk is kept
        kept = rows if fits == len(seeds) else rows[:fits].clone()
        self.rows.update(((seed, block), row) for seed, row in zip(seeds[:fits], kept))
        self.used += fits * row_bytes


class Bases:
    """Regenerates bases in chunks on `device`, through a `BasisCache`, and counts the rows
    it really generated (what the cache and the zero-skipping save is measurable)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, cache_bytes: int):
        self.device, self.dtype = torch.device(device), dtype
        self.cache = BasisCache(cache_bytes)
        self.generated = 0

    def rows(self, seeds: Sequence[int], block: int, d: int) -> torch.Tensor:
        cached = [self.cache.get(s, block) for s in seeds]
        missing = [s for s, row in zip(seeds, cached) if row is None]
        if missing:
            fresh = generate(missing, block, d, self.device)
            self.generated += len(missing)
            self.cache.put(missing, block, fresh)
            if len(missing) == len(seeds):
                return fresh.to(self.dtype)
            new = iter(fresh)
            cached = [row if row is not None else next(new) for row in cached]
        return torch.stack(cached).to(self.dtype)

    def chunks(self, seeds: Sequence[int], block: int, d: int) -> Iterator[tuple[int, torch.Tensor]]:
        step = max(1, CHUNK_ELEMENTS // d)
        for start in range(0, len(seeds), step):
            yield start, self.rows(seeds[start : start + step], block, d)

    def project(self, delta: torch.Tensor, seeds: Sequence[int], block: int, orthogonal: bool = False) -> torch.Tensor:
        """⟨Δ, v_k⟩ for every seed (unscaled), in fp32."""
        delta = delta.to(self.device, self.dtype)
        if orthogonal:
            q = orthonormal(self.rows(seeds, block, delta.numel()))
            out = torch.zeros(len(seeds), dtype=torch.float32, device=self.device)
            out[: len(q)] = (q @ delta).float()
            return out
        out = torch.empty(len(seeds), dtype=torch.float32, device=self.device)
        for start, v in self.chunks(seeds, block, delta.numel()):
            out[start : start + len(v)] = (v @ delta).float()
        return out

    def reconstruct(self, coords: torch.Tensor, seeds: Sequence[int], block: int, d: int,
                    orthogonal: bool = False, clip: float | None = None) -> torch.Tensor:
        """Σ_k clip(γ_k v_k) over the non-zero coordinates (zeros cost no generation), fp32."""
        coords = coords.to(self.device, self.dtype)
        out = torch.zeros(d, dtype=torch.float32, device=self.device)
        if orthogonal:
            q = orthonormal(self.rows(seeds, block, d))
            return out.add_((_clipped(coords[: len(q)], q, clip) @ q).float())
        keep = torch.nonzero(coords).flatten().tolist()
        seeds, coords = [seeds[i] for i in keep], coords[keep]
        for start, v in self.chunks(seeds, block, d):
            out.add_((_clipped(coords[start : start + len(v)], v, clip) @ v).float())
        return out


def _clipped(coords: torch.Tensor, bases: torch.Tensor, clip: float | None) -> torch.Tensor:
    # the official code clips every (seed, block) term γ_k v_k to norm `clip` (max_norm=10)
    if clip is None:
        return coords
    norms = coords.abs() * bases.norm(dim=1)
    return coords * torch.clamp(clip / (norms + 1e-8), max=1.0)

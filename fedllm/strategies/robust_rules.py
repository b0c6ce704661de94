"""Byzantine-robust aggregation rules: pure functions of the stacked client vectors
X ∈ R^{n×d} (one row per client message, the whole adapter flattened) and f, the number of
Byzantine rows to tolerate. A rule taking f checks its requirement on n first (`require`);
the strategies in robust.py check it for the two that do not (geometric median, centered
clipping: n ≥ 2f+1).

References: coordinate-wise median and trimmed mean (Yin et al., ICML 2018); Krum and
Multi-Krum (Blanchard et al., NeurIPS 2017); Bulyan (El Mhamdi et al., ICML 2018); geometric
median by smoothed Weiszfeld (Pillutla et al., RFA, IEEE TSP 2022); centered clipping
(Karimireddy et al., ICML 2021); nearest-neighbour mixing (Allouah et al., "Fixing by
Mixing", AISTATS 2023; the server form of MoNNA, Farhadkhani et al., ICML 2023).
"""
from __future__ import annotations

import torch


def require(rule: str, n: int, f: int, minimum: int, formula: str) -> None:
    if f < 0:
        raise ValueError(f"{rule}: f (Byzantine clients to tolerate) must be ≥ 0, got {f}")
    if n < minimum:
        raise ValueError(
            f"{rule} with f={f} needs n ≥ {formula} = {minimum} client messages per round, got n={n}: "
            "sample more clients per round (federation.clients_per_round) or lower f"
        )


def median(X: torch.Tensor, f: int = 0) -> torch.Tensor:
    """Coordinate-wise median (mean of the two middle values when n is even)."""
    n = X.shape[0]
    require("median", n, f, 2 * f + 1, "2f+1")
    s = X.sort(dim=0).values
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def trimmed_mean(X: torch.Tensor, f: int = 0, trim: int | None = None) -> torch.Tensor:
    """Coordinate-wise mean after dropping the `trim` (default f, must be ≥ f) largest and
    smallest values."""
    n, b = X.shape[0], f if trim is None else trim
    if b < f:
        raise ValueError(f"trimmed_mean: trim={b} per side cannot tolerate f={f}; use trim ≥ f")
    require("trimmed_mean", n, f, 2 * b + 1, "2·trim+1")
    return X.sort(dim=0).values[b : n - b].mean(dim=0)


def squared_distances(X: torch.Tensor) -> torch.Tensor:
    """[n, n] squared Euclidean distances in fp64, row by row (no ‖a‖²+‖b‖²−2⟨a,b⟩
    cancellation)."""
    Y = X.double()
    return torch.stack([((Y - row) ** 2).sum(dim=1) for row in Y])


def krum_scores(D: torch.Tensor, f: int) -> torch.Tensor:
    """Score_i = sum of the squared distances from i to its n−f−2 nearest other rows."""
    n = D.shape[0]
    closest = max(n - f - 2, 1) if n > 1 else 0
    others = D + torch.diag(torch.full((n,), float("inf"), dtype=D.dtype))  # never count oneself
    return others.sort(dim=1).values[:, :closest].sum(dim=1)


def krum(X: torch.Tensor, f: int = 0) -> torch.Tensor:
    """The row with the lowest Krum score (an input, never a blend)."""
    require("krum", X.shape[0], f, 2 * f + 3, "2f+3")
    return X[int(krum_scores(squared_distances(X), f).argmin())]


def multi_krum(X: torch.Tensor, f: int = 0, m: int | None = None) -> torch.Tensor:
    """Mean of the m rows with the lowest Krum scores (default m = n − f)."""
    n = X.shape[0]
    require("multi_krum", n, f, 2 * f + 3, "2f+3")
    m = n - f if m is None else m
    if not 1 <= m <= n - f:
        raise ValueError(f"multi_krum: m must be in [1, n−f] = [1, {n - f}], got {m}")
    chosen = krum_scores(squared_distances(X), f).argsort()[:m]
    return X[chosen].mean(dim=0)


def bulyan(X: torch.Tensor, f: int = 0) -> torch.Tensor:
    """Bulyan (El Mhamdi et al. 2018, Alg. 1): pick θ = n − 2f rows by repeated Krum on the
    rows left, then per coordinate average the β = θ − 2f picked values closest to their median."""
    n = X.shape[0]
    require("bulyan", n, f, 4 * f + 3, "4f+3")
    D = squared_distances(X)
    left, picked = list(range(n)), []
    for _ in range(n - 2 * f):
        scores = krum_scores(D[left][:, left], f)
        picked.append(left.pop(int(scores.argmin())))
    S = X[picked]
    beta = len(picked) - 2 * f
    closest = (S - median(S)).abs().argsort(dim=0)[:beta]
    return S.gather(0, closest).mean(dim=0)


def geometric_median(X: torch.Tensor, nu: float = 0.1, iterations: int = 3) -> torch.Tensor:
    """Smoothed Weiszfeld (RFA Alg. 2, equal weights): z ← Σ β_i x_i / Σ β_i with
    β_i = 1/max(ν, ‖z − x_i‖). It starts from the coordinate-wise median (a line the MoNNA
    code keeps commented out; it starts from 0): from there 3 iterations land within 1% of
    the converged geometric median on the reference attack, from 0 they are 2× off."""
    z = median(X)
    for _ in range(iterations):
        distances = torch.linalg.vector_norm(X.double() - z.double(), dim=1).clamp_min(nu)
        beta = (1.0 / distances).to(X.dtype)
        z = (beta[:, None] * X).sum(dim=0) / beta.sum()
    return z


def centered_clip(X: torch.Tensor, center: torch.Tensor, tau: float, iterations: int = 3) -> torch.Tensor:
    """Karimireddy et al. 2021, Eq. 2, L times: v ← v + mean_i clip_τ(x_i − v), from the
    previous round's aggregate. Each pass moves v by at most τ."""
    if tau <= 0:
        raise ValueError(f"centered_clip: tau must be > 0, got {tau}")
    v = center.to(X.dtype)
    for _ in range(iterations):
        diff = X - v
        norms = torch.linalg.vector_norm(diff.double(), dim=1)
        scale = (tau / norms.clamp_min(1e-300)).clamp(max=1.0).to(X.dtype)
        v = v + (scale[:, None] * diff).mean(dim=0)
    return v


def nearest_neighbor_mixing(X: torch.Tensor, f: int) -> torch.Tensor:
    """Replaces each row by the mean of its n − f nearest rows, itself included (NNM)."""
    n = X.shape[0]
    require("nearest-neighbour mixing", n, f, 2 * f + 1, "2f+1")
    nearest = squared_distances(X).argsort(dim=1)[:, : n - f]
    return X[nearest].mean(dim=1)

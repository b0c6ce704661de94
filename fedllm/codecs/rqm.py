"""RQM, the Randomized Quantization Mechanism — Youn, Hu, Ziani & Abernethy, "Randomized
Quantization is All You Need for Differential Privacy in Federated Learning" (FL-ICML 2023,
arXiv 2306.11913).

Per coordinate x of the upload: clip to [−c, c]; put m levels evenly on [−X, X] with
X = c + Δ (the range extension); keep each interior level with probability q (the two
endpoints always); round x to the kept level just below or just above it, up with
probability (x − lo)/(hi − lo). The rounding is unbiased for every kept set, so
E[decode(x)] = clip(x); the server decodes level j as its value and averages as usual. The
wire carries the level index in ⌈log2 m⌉ bits per coordinate. Kept sets and rounding are
drawn independently per coordinate from the (run seed, round, client) generator.

Privacy, stated plainly. The paper proves Rényi DP for the *scalar* mechanism: its output
distribution changes boundedly between any two inputs in [−c, c], thanks to the two random
layers (needs q < 1 and Δ > 0; q = 1 or Δ = 0 is no privacy). We do not restate the paper's
closed-form bound; `accounting` computes the exact Rényi divergence of the scalar mechanism
as implemented, from its closed-form output distribution, maximised over a grid of input
pairs that includes ±c. That guarantee is per coordinate. A client's update has d
coordinates, each privatised independently, and a neighbouring client may change all of
them, so for the whole upload the Rényi divergences add: d·ε(α) per message, and then over
the rounds a client takes part in. For adapter-sized d (10⁵–10⁷) that bound is vacuous; the
codec reports both numbers (`rqm_epsilon_coordinate` and `rqm_epsilon`), worst case a
client in every round, and claims nothing beyond them."""
from __future__ import annotations

import math

import numpy as np
import torch

import fedllm.codecs.framing as framing
from fedllm.codecs.base import Codec
from fedllm.codecs.bitstream import bit_width, pack_uints, unpack_uints
from fedllm.privacy.accountant import ORDERS, rdp_lib
from fedllm.registry import CODECS
from fedllm.wire import Message

CHUNK = 1 << 15  # coordinates per vectorised step: bounds the (chunk × m) kept masks


def level_values(clip: float, extension: float, m: int) -> np.ndarray:
    """B(j) = −X + 2Xj/(m−1), j = 0..m−1, X = c + Δ."""
    top = clip + extension
    return -top + 2 * top * np.arange(m) / (m - 1)


def kept_levels(count: int, m: int, q: float, rng: np.random.Generator) -> np.ndarray:
    kept = rng.random((count, m)) < q
    kept[:, 0] = kept[:, -1] = True
    return kept


def bracket(x: np.ndarray, kept: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each x (inside [B(0), B(m−1)]) and its row of kept levels: the nearest kept level
    index below (lo) and above (hi) and the probability of rounding up."""
    m = values.size
    cell = np.clip(np.floor((x - values[0]) / (values[1] - values[0])).astype(np.int64), 0, m - 2)  # B(cell) ≤ x < B(cell+1)
    index = np.broadcast_to(np.arange(m), kept.shape)
    below = np.maximum.accumulate(np.where(kept, index, -1), axis=1)  # last kept level at or before j
    above = np.minimum.accumulate(np.where(kept, index, m)[:, ::-1], axis=1)[:, ::-1]  # first kept at or after j
    lo = np.take_along_axis(below, cell[:, None], axis=1)[:, 0]
    hi = np.take_along_axis(above, cell[:, None] + 1, axis=1)[:, 0]
    return lo, hi, (x - values[lo]) / (values[hi] - values[lo])


def output_pmf(x: float, clip: float, extension: float, m: int, q: float) -> np.ndarray:
    """P(level j | x) in closed form: the nearest kept level below x is i with probability
    q(1−q)^(cell−i) (the endpoint: (1−q)^cell), above it k with q(1−q)^(k−cell−1) (the endpoint:
    (1−q)^(m−2−cell)); the two are independent, then x rounds between them."""
    values = level_values(clip, extension, m)
    x = min(max(x, -clip), clip)
    cell = min(max(int(math.floor((x - values[0]) / (values[1] - values[0]))), 0), m - 2)
    low, high = np.arange(cell + 1), np.arange(cell + 1, m)
    p_low = np.where(low == 0, (1 - q) ** cell, q * (1 - q) ** (cell - low))
    p_high = np.where(high == m - 1, (1 - q) ** (m - 2 - cell), q * (1 - q) ** (high - cell - 1))
    joint = p_low[:, None] * p_high[None, :]
    span = values[high][None, :] - values[low][:, None]
    up = (x - values[low][:, None]) / span
    pmf = np.zeros(m)
    pmf[: cell + 1] = (joint * (1 - up)).sum(axis=1)
    pmf[cell + 1 :] = (joint * up).sum(axis=0)
    return pmf


def renyi_per_coordinate(clip: float, extension: float, m: int, q: float, grid: int = 21) -> np.ndarray:
    """max over input pairs (x, x') on a grid of [−c, c] of D_α(P_x ‖ P_x'), at every α in ORDERS."""
    pmfs = np.stack([output_pmf(x, clip, extension, m, q) for x in np.linspace(-clip, clip, grid)])
    alphas = np.asarray(ORDERS)[:, None, None, None]
    with np.errstate(divide="ignore"):
        log_p, log_r = np.log(pmfs)[None, :, None, :], np.log(pmfs)[None, None, :, :]
    # log Σ_j p_j^α r_j^(1−α), in log space (orders reach 1024); a level that x reaches and
    # x' never does (r = 0 < p) makes the divergence infinite: no privacy
    with np.errstate(invalid="ignore"):
        exponent = np.where(np.isfinite(log_p), alphas * log_p + (1 - alphas) * log_r, -np.inf)
    top = exponent.max(-1, keepdims=True)
    with np.errstate(invalid="ignore"):
        log_sum = np.where(np.isfinite(top[..., 0]), top[..., 0] + np.log(np.exp(exponent - top).sum(-1)), top[..., 0])
    divergence = log_sum / (alphas[..., 0] - 1)
    return divergence.reshape(len(ORDERS), -1).max(axis=1)


@CODECS.register("rqm")
class RQM(Codec):
    """RQM: randomized quantization (random kept levels + unbiased rounding), ⌈log2 m⌉ bits/coordinate."""

    randomizes = True

    def __init__(
        self,
        clip: float,  # c: each coordinate is clipped to [−c, c]
        extension: float | None = None,  # Δ: levels span [−(c+Δ), c+Δ] (default Δ = c)
        levels: int = 16,  # m
        keep_prob: float = 0.5,  # q: each interior level survives with this probability
        delta: float = 1e-5,  # the δ at which the accounting reports ε
    ):
        extension = clip if extension is None else extension
        if clip <= 0 or extension < 0 or levels < 2 or not 0 <= keep_prob <= 1:
            raise ValueError("rqm: needs clip > 0, extension ≥ 0, levels ≥ 2 and keep_prob in [0, 1]")
        self.clip, self.extension, self.levels, self.keep_prob, self.delta = clip, extension, levels, keep_prob, delta
        self.values = level_values(clip, extension, levels)
        self.width = bit_width(levels)
        self.dimension = None  # coordinates per upload, learnt from the first message
        self._rdp = None

    def quantize(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Level indices of the coordinates of x."""
        flat = np.clip(x.reshape(-1).astype(np.float64), -self.clip, self.clip)
        out = []
        for start in range(0, flat.size, CHUNK):
            chunk = flat[start : start + CHUNK]
            lo, hi, up = bracket(chunk, kept_levels(chunk.size, self.levels, self.keep_prob, rng), self.values)
            out.append(np.where(rng.random(chunk.size) < up, hi, lo))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def encode(self, message: Message, ctx) -> Message:
        floating, passthrough = framing.split_floating(message)
        rng = framing.rng(ctx, "rqm")
        entries = [(framing.describe(name, t), pack_uints(self.quantize(t.detach().cpu().double().numpy(), rng), self.width))
                   for name, t in floating.items()]
        self.dimension = sum(t.numel() for t in floating.values())
        return framing.pack(message, "rqm", entries, passthrough)

    def decode(self, message: Message, ctx) -> Message:
        entries, tensors, meta = framing.unpack(message, "rqm", ctx)
        for info, data in entries:
            name, size = info["name"], framing.numel(info)
            expected = math.ceil(size * self.width / 8)
            framing.check(len(data) == expected, "rqm", name, f"{len(data)} bytes, {size} levels of {self.width} bits take {expected}")
            with framing.guard("rqm", name):
                index = unpack_uints(data, self.width, size)
                framing.check(index.size == 0 or int(index.max()) < self.levels, "rqm", name, f"a level index is not below {self.levels}")
                tensors[name] = framing.restore(torch.from_numpy(self.values[index]), info)
        self.dimension = sum(framing.numel(info) for info, _ in entries)
        return Message(tensors, meta)

    def rdp_per_coordinate(self) -> np.ndarray:
        if self._rdp is None:
            self._rdp = renyi_per_coordinate(self.clip, self.extension, self.levels, self.keep_prob)
        return self._rdp

    def accounting(self, rounds_done: int) -> dict:
        """ε at δ after `rounds_done` messages from one client: per coordinate, and for the
        whole d-coordinate upload (composition over coordinates)."""
        rdp = self.rdp_per_coordinate() * rounds_done

        def epsilon(curve):
            return float(rdp_lib.compute_epsilon(list(ORDERS), curve, self.delta)[0]) if rounds_done else 0.0

        report = {"rqm_epsilon_coordinate": epsilon(rdp), "rqm_delta": self.delta}
        if self.dimension:
            report["rqm_epsilon"] = epsilon(rdp * self.dimension)
        return report

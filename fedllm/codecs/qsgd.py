"""QSGD-style unbiased stochastic quantization — Alistarh et al., NeurIPS 2017, Eq. (2)-(3).

Each tensor is cut into buckets of `bucket_size` entries (§3.2: per-bucket norms keep the
variance down). In a bucket v with norm ‖v‖ and s = `levels`, entry v_i is sent as
sign(v_i)·ℓ_i with

    ℓ_i = ⌊s|v_i|/‖v‖⌋ + 1 with probability s|v_i|/‖v‖ − ⌊s|v_i|/‖v‖⌋, else ⌊s|v_i|/‖v‖⌋,

and decoded as ‖v‖·sign(v_i)·ℓ_i/s, so E[decode] = v (stochastic rounding is unbiased).
Wire: one fp32 norm per bucket and each signed level in ⌈log2(2s+1)⌉ bits. (The paper's Elias
integer coding, which shortens runs of zero levels, is not used: fixed width keeps decoding
vectorised, and the ledger reports what is really sent.) Randomness is seeded by (run seed,
round, client), so a run replays exactly."""
from __future__ import annotations

import math

import numpy as np
import torch

import fedllm.codecs.framing as framing
from fedllm.codecs.base import Codec
from fedllm.codecs.bitstream import bit_width, pack_uints, unpack_uints
from fedllm.registry import CODECS
from fedllm.wire import Message


def buckets(x: np.ndarray, size: int) -> np.ndarray:
    """x flattened and zero-padded to whole buckets: shape (n_buckets, size)."""
    flat = x.reshape(-1)
    return np.concatenate([flat, np.zeros((-flat.size) % size)]).reshape(-1, size)


def quantize(x: np.ndarray, levels: int, bucket_size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(per-bucket norms, signed integer levels in [−s, s] per entry, padded to whole buckets)."""
    v = buckets(x.astype(np.float64), bucket_size)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    scaled = levels * np.abs(v) / np.maximum(norms, np.finfo(np.float64).tiny)
    floor = np.floor(scaled)
    up = rng.random(scaled.shape) < (scaled - floor)
    return norms[:, 0].astype(np.float32), (np.sign(v) * (floor + up)).astype(np.int64)


@CODECS.register("qsgd")
class QSGD(Codec):
    """QSGD: unbiased stochastic quantization to s levels per bucket (norm-scaled)."""

    def __init__(self, levels: int = 7, bucket_size: int = 512):
        if levels < 1 or bucket_size < 1:
            raise ValueError("qsgd: levels and bucket_size must be ≥ 1")
        self.levels, self.bucket_size = levels, bucket_size
        self.width = bit_width(2 * levels + 1)

    def encode(self, message: Message, ctx) -> Message:
        floating, passthrough = framing.split_floating(message)
        rng = framing.rng(ctx, "qsgd")
        entries = []
        for name, t in floating.items():
            norms, signed = quantize(t.detach().cpu().double().numpy(), self.levels, self.bucket_size, rng)
            data = framing.floats_to_bytes(torch.from_numpy(norms)) + pack_uints((signed + self.levels).ravel(), self.width)
            entries.append((framing.describe(name, t), data))
        return framing.pack(message, "qsgd", entries, passthrough)

    def decode(self, message: Message, ctx) -> Message:
        entries, tensors, meta = framing.unpack(message, "qsgd", ctx)
        for info, data in entries:
            name, size = info["name"], framing.numel(info)
            n_buckets = math.ceil(size / self.bucket_size)
            expected = 4 * n_buckets + math.ceil(n_buckets * self.bucket_size * self.width / 8)
            framing.check(len(data) == expected, "qsgd", name,
                          f"{len(data)} bytes, {n_buckets} buckets of {self.bucket_size} take {expected}")
            with framing.guard("qsgd", name):
                norms = framing.bytes_to_floats(data[: 4 * n_buckets]).double().numpy()
                levels = unpack_uints(data[4 * n_buckets:], self.width, n_buckets * self.bucket_size)
                framing.check(levels.size == 0 or int(levels.max()) <= 2 * self.levels, "qsgd", name,
                              f"a level is outside [-{self.levels}, {self.levels}]")
                signed = levels - self.levels
                values = norms[:, None] * signed.reshape(n_buckets, self.bucket_size) / self.levels
                tensors[name] = framing.restore(torch.from_numpy(values.reshape(-1)[:size]), info)
        return Message(tensors, meta)

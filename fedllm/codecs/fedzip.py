"""FedZip — Malekijoo et al. 2021 (arXiv 2102.01593): per tensor, top-z sparsification,
1-D k-means quantization (k = 3: the zeros' cluster and one each side), then a real
lossless encoding of the cluster ids. The original code printed an estimate of the encoded
size; here the bitstream is what travels, and the ledger counts its bytes.

Per tensor the payload is the k centroids (fp32) followed by one of three encodings of the
cluster id of every entry (`encoding: auto` keeps the shortest):
- huffman:  a canonical Huffman code over the k ids (the header carries the code lengths);
- position: the majority id is implicit; each other entry sends its index in ⌈log2 d⌉ bits
            and which minority id it holds in ⌈log2 (k−1)⌉ bits;
- gap:      as position, but the indices as Rice-coded gaps (zeros between successive
            minority entries) — the code for the geometric runs of a random sparse mask.

Bounds worth knowing (1e5 N(0,1) entries, k = 3): an entry costs ≥ 1 bit under Huffman, so
Huffman stays below 32×; at 20% density a lossless code must carry the positions *and* the
signs, ≥ 1e5·(H(0.2) + 0.2) bits, so no encoding beats 34.7×; ratios near 1000× need ~0.1%
density.

`error_feedback: true` (not part of FedZip) keeps what a round did not send — the dropped
80% and the quantization error — in the client store and adds it to the client's next
update, as top-k with error feedback does."""
from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

import fedllm.codecs.framing as framing
from fedllm.codecs.bitstream import (
    bit_width, huffman_decode, huffman_encode, huffman_lengths, pack_uints, rice_decode, rice_encode,
    rice_parameter, unpack_uints,
)
from fedllm.codecs.base import Codec
from fedllm.registry import CODECS
from fedllm.wire import Message

ENCODINGS = ("huffman", "gap", "position")  # the order breaks ties under `auto`


def top_z(x: torch.Tensor, keep: float) -> torch.Tensor:
    """x with all but its ⌈keep·d⌉ largest-magnitude entries set to zero."""
    flat = x.reshape(-1)
    out = torch.zeros_like(flat)
    index = torch.topk(flat.abs(), framing.kept_count(keep, flat.numel()), sorted=False).indices
    out[index] = flat[index]
    return out.reshape(x.shape)


def kmeans_1d(x: torch.Tensor, k: int, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's algorithm on the entries of x from k centroids evenly spaced on [min, max].
    Returns (sorted fp32 centroids, the cluster id of every entry). In 1-D the centroids
    stay sorted, so assignment is a binary search against the midpoints; an empty cluster
    keeps its centroid. (numpy: single-threaded, so small tensors stay fast on busy cores.)"""
    flat = x.reshape(-1).double().numpy()
    if flat.size == 0:
        return torch.zeros(k), torch.zeros(0, dtype=torch.long)
    centroids = np.linspace(flat.min(), flat.max(), k)

    def assign(c):
        return np.searchsorted((c[1:] + c[:-1]) / 2, flat, side="left")

    for _ in range(iterations):
        labels = assign(centroids)
        counts = np.bincount(labels, minlength=k)
        sums = np.bincount(labels, weights=flat, minlength=k)
        centroids = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
    centroids = centroids.astype(np.float32)
    return torch.from_numpy(centroids), torch.from_numpy(assign(centroids.astype(np.float64)))


# ---- the three encodings of the cluster ids ------------------------------------------------
def minority(ids: np.ndarray, k: int) -> tuple[int, np.ndarray, np.ndarray]:
    """(majority id, positions of the other entries, which other id each holds as 0..k−2)."""
    majority = int(np.bincount(ids, minlength=k).argmax())
    positions = np.flatnonzero(ids != majority)
    others = ids[positions]
    return majority, positions, others - (others > majority)


def encode_ids(ids: np.ndarray, k: int, encoding: str) -> tuple[dict, bytes]:
    if encoding == "huffman":
        lengths = huffman_lengths(np.bincount(ids, minlength=k))
        return {"enc": "huffman", "lengths": lengths.tolist()}, huffman_encode(ids, lengths)
    majority, positions, which = minority(ids, k)
    symbols = pack_uints(which, bit_width(k - 1))
    info = {"enc": encoding, "majority": majority, "count": int(positions.size)}
    if encoding == "position":
        return info, pack_uints(positions, bit_width(ids.size)) + symbols
    gaps = np.diff(positions, prepend=-1) - 1
    r = rice_parameter(gaps)
    runs = rice_encode(gaps, r)
    return {**info, "rice": r, "gap_bytes": len(runs)}, runs + symbols


def check_code(lengths, k: int, name, size: int) -> np.ndarray:
    """Huffman code lengths from a header: k of them, each 0..64, forming a complete prefix
    code (Kraft sum 1, what `huffman_lengths` builds), or one symbol of 1 bit, or none for
    an empty tensor. This bounds the decoding tables to k − 1 internal nodes."""
    framing.check(isinstance(lengths, list) and len(lengths) == k and all(type(n) is int and 0 <= n <= 64 for n in lengths),
                  "fedzip", name, f"Huffman lengths {framing.short(lengths)} are not {k} integers in [0, 64]")
    used = [n for n in lengths if n]
    kraft = sum(1 << (64 - n) for n in used)
    framing.check(kraft == 1 << 64 or used == [1] or (size == 0 and not used), "fedzip", name, f"Huffman lengths {framing.short(lengths)} are not a complete prefix code")
    return np.asarray(lengths, dtype=np.int64)


def decode_ids(info: dict, data: bytes, size: int, k: int, name=None) -> np.ndarray:
    """The cluster id of each of `size` entries. Every field of `info` and the length of
    `data` are checked against what the encoding implies before anything is allocated."""
    enc = info.get("enc")
    framing.check(enc in ENCODINGS, "fedzip", name, f"encoding {framing.short(enc)} is not one of {list(ENCODINGS)}")
    if enc == "huffman":
        lengths = check_code(info.get("lengths"), k, name, size)
        shortest = int(lengths[lengths > 0].min()) if size else 0
        framing.check(size * shortest <= 8 * len(data), "fedzip", name,
                      f"{len(data)} bytes cannot hold {size} Huffman codes of ≥ {shortest} bits")
        return huffman_decode(data, lengths, size)
    count = framing.integer(info, "count", 0, size, "fedzip", name)
    majority = framing.integer(info, "majority", 0, k - 1, "fedzip", name)
    width, symbol_width = bit_width(size), bit_width(k - 1)
    symbol_bytes = math.ceil(count * symbol_width / 8)
    if enc == "position":
        framing.check(len(data) == math.ceil(count * width / 8) + symbol_bytes, "fedzip", name,
                      f"{len(data)} bytes, position encoding of {count} entries takes {math.ceil(count * width / 8) + symbol_bytes}")
        positions = unpack_uints(data, width, count)
        data = data[math.ceil(count * width / 8):]
    else:
        rice = framing.integer(info, "rice", 0, 62, "fedzip", name)
        gap_bytes = framing.integer(info, "gap_bytes", 0, len(data), "fedzip", name)
        framing.check(len(data) == gap_bytes + symbol_bytes, "fedzip", name,
                      f"{len(data)} bytes, gap encoding of {count} entries takes {gap_bytes} + {symbol_bytes}")
        positions = np.cumsum(rice_decode(data[:gap_bytes], rice, count, max_value=size) + 1) - 1
        data = data[gap_bytes:]
    # strictly increasing (gaps are ≥ 0 by construction), so in range if the last one is
    framing.check(count == 0 or (bool((np.diff(positions) > 0).all()) and int(positions[-1]) < size), "fedzip", name,
                  f"positions are not increasing indices below {size}")
    which = unpack_uints(data, symbol_width, count)
    framing.check(count == 0 or int(which.max()) <= k - 2, "fedzip", name, f"a minority id is not below {k - 1}")
    ids = np.full(size, majority, dtype=np.int64)
    ids[positions] = which + (which >= majority)
    return ids


@CODECS.register("fedzip")
class FedZip(Codec):
    """FedZip: top-z sparsification, k-means quantization, Huffman/position/gap bitstream."""

    def __init__(
        self,
        keep: float = 0.2,  # z: fraction of each tensor's entries kept (the FedZip code keeps 20%)
        clusters: int = 3,  # k of the k-means quantizer
        iterations: int = 4,  # Lloyd iterations from the evenly spaced start
        encoding: Literal["auto", "huffman", "position", "gap"] = "auto",
        error_feedback: bool = False,  # not in FedZip: carry what was not sent to the client's next round
    ):
        if not 0 < keep <= 1:
            raise ValueError(f"fedzip: keep must be in (0, 1], got {keep}")
        if not 2 <= clusters <= 256:
            raise ValueError(f"fedzip: clusters must be in [2, 256], got {clusters}")
        self.keep, self.clusters, self.iterations, self.encoding = keep, clusters, iterations, encoding
        self.error_feedback = error_feedback

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        """(centroids, cluster id per entry) of the sparsified tensor."""
        centroids, ids = kmeans_1d(top_z(x.float(), self.keep), self.clusters, self.iterations)
        return centroids, ids.numpy()

    def encode_tensor(self, x: torch.Tensor, residual: dict | None = None, name: str = "") -> tuple[dict, bytes]:
        """The tensor's description and bytes. With `residual` (error feedback), x plus the
        stored residual is what gets quantized, and what it loses becomes the new residual."""
        if residual is not None:
            x = x.float() + residual[name] if name in residual else x.float()
        centroids, ids = self.quantize(x)
        if residual is not None:
            residual[name] = x - centroids[torch.from_numpy(ids)].reshape(x.shape)
        tried = [encode_ids(ids, self.clusters, e) for e in (ENCODINGS if self.encoding == "auto" else [self.encoding])]
        info, data = min(tried, key=lambda pair: len(pair[1]))
        return info, framing.floats_to_bytes(centroids) + data

    def decode_tensor(self, info: dict, data: bytes) -> torch.Tensor:
        """One entry of a payload `framing.unpack` has checked."""
        k, name = self.clusters, info.get("name")
        framing.check(len(data) >= 4 * k, "fedzip", name, f"{len(data)} bytes, too short for {k} fp32 centroids")
        with framing.guard("fedzip", name):
            centroids = framing.bytes_to_floats(data[: 4 * k])
            ids = decode_ids(info, data[4 * k:], framing.numel(info), k, name)
            return framing.restore(centroids[torch.from_numpy(ids)], info)

    def encode(self, message: Message, ctx) -> Message:
        floating, passthrough = framing.split_floating(message)
        residual = framing.client_state(ctx, "fedzip") if self.error_feedback else None
        entries = []
        for name, t in floating.items():
            info, data = self.encode_tensor(t.detach().cpu(), residual, name)
            entries.append((framing.describe(name, t, **info), data))
        return framing.pack(message, "fedzip", entries, passthrough)

    def decode(self, message: Message, ctx) -> Message:
        entries, tensors, meta = framing.unpack(message, "fedzip", ctx)
        for info, data in entries:
            tensors[info["name"]] = self.decode_tensor(info, data)
        return Message(tensors, meta)

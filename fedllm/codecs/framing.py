"""How a bit-level codec lays out a message: the float tensors it encodes become ONE uint8
tensor under the codec's name, and those bytes are what the ledger counts. The payload is

    [4 bytes: n] [n bytes: zlib-compressed JSON describing each entry] [entry bytes ...]

The description (names, shapes, dtypes, coder parameters) travels inside the payload,
compressed — parameter names share long prefixes, and for a small adapter an uncompressed
header would outweigh the bitstream. Tensors the codec does not encode (integer seeds,
indices) pass through unchanged."""
from __future__ import annotations

import json
import math
import struct
import zlib

import numpy as np
import torch

from fedllm.seeds import derive
from fedllm.wire import Message

DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}


def kept_count(keep: float, size: int) -> int:
    # ⌈z·d⌉, robust to the float product landing a hair above an integer (0.2·1e5)
    return min(size, math.ceil(round(keep * size, 9)))


def split_floating(message: Message) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(float tensors to encode, other tensors to pass through), each in message order."""
    floating = {k: t for k, t in message.tensors.items() if t.is_floating_point()}
    return floating, {k: t for k, t in message.tensors.items() if k not in floating}


def describe(name: str, tensor: torch.Tensor, **coder) -> dict:
    return {"name": name, "shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch."), **coder}


def pack(message: Message, key: str, entries: list[tuple[dict, bytes]], passthrough: dict) -> Message:
    """One uint8 tensor `key`: the compressed descriptions, then every entry's bytes."""
    if key in message.tensors:
        raise ValueError(f"codec '{key}' is already applied to this message (or a tensor is named '{key}')")
    header = zlib.compress(json.dumps([{**info, "bytes": len(chunk)} for info, chunk in entries],
                                      separators=(",", ":")).encode(), 9)
    payload = bytearray(struct.pack("<I", len(header)) + header + b"".join(chunk for _, chunk in entries))
    return Message({**passthrough, key: torch.frombuffer(payload, dtype=torch.uint8)}, dict(message.meta))


def unpack(message: Message, key: str) -> tuple[list[tuple[dict, bytes]], dict, dict]:
    """Inverse of `pack`: ([(description, bytes)], passthrough tensors, meta)."""
    if key not in message.tensors:
        raise ValueError(f"codec '{key}': the message has no '{key}' payload (was it encoded by this codec?)")
    data = message.tensors[key].numpy().tobytes()
    (size,) = struct.unpack("<I", data[:4])
    entries, offset = [], 4 + size
    for info in json.loads(zlib.decompress(data[4:offset])):
        entries.append((info, data[offset : offset + info["bytes"]]))
        offset += info["bytes"]
    if offset != len(data):
        raise ValueError(f"codec '{key}': payload has {len(data)} bytes, its entries describe {offset}")
    passthrough = {k: t for k, t in message.tensors.items() if k != key}
    return entries, passthrough, dict(message.meta)


def restore(values: torch.Tensor, info: dict) -> torch.Tensor:
    """A decoded flat fp32/fp64 tensor in its original shape and dtype."""
    return values.reshape(info["shape"]).to(DTYPES[info["dtype"]])


def client_state(ctx, codec: str) -> dict:
    state = ctx.state
    if state is None:
        raise RuntimeError(
            f"{codec}: error feedback keeps a per-client residual, but this engine passes codecs no "
            "client state (WireContext.state); set error_feedback: false"
        )
    return state


def rng(ctx, codec: str) -> np.random.Generator:
    """The random stream of one (run seed, round, client, codec): the same on any rank and
    after a resume, independent of the global RNGs."""
    # client + 1: the engine's template client −1 must be a valid SeedSequence word
    return np.random.default_rng(derive(ctx.seed, ctx.round, ctx.client_id + 1, tag=codec))


def floats_to_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().float().numpy().astype("<f4").tobytes()


def bytes_to_floats(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(data, dtype="<f4").copy())

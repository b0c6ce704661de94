"""How a bit-level codec lays out a message: the float tensors it encodes become ONE uint8
tensor under the codec's name, and those bytes are what the ledger counts. The payload is

    [4 bytes: n] [n bytes: zlib-compressed JSON describing each entry] [entry bytes ...]

The description (names, shapes, dtypes, coder parameters) travels inside the payload,
compressed — parameter names share long prefixes, and for a small adapter an uncompressed
header would outweigh the bitstream. Tensors the codec does not encode (integer seeds,
indices) pass through unchanged.

Decoding trusts nothing in the payload (STYLE: untrusted bytes are validated against what we
expect). Before anything is allocated, `unpack` checks the header against limits: at most
`max_elements(ctx)` decoded elements per message (so per tensor), MAX_ENTRIES entries, a
header that inflates to at most MAX_HEADER_BYTES, dtypes from DTYPES, byte counts that add up
to the payload; each codec then checks its own parameters and that every entry's bytes are
exactly as long as its description implies. Anything wrong raises `MalformedMessage` naming
the codec, the tensor and the fault."""
from __future__ import annotations

import json
import math
import struct
import zlib
from contextlib import contextmanager

import numpy as np
import torch

from fedllm.seeds import derive
from fedllm.wire import MalformedMessage, Message

DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}

# ---- limits on what an untrusted payload may make the receiver allocate ----------------------
# Elements one message may decode to (all its tensors together, so each tensor too) when the
# caller states no limit (`ctx.max_elements`): 2^31 ≈ 2.1e9, 8 GiB as fp32 — a whole
# 2B-parameter model, far above any adapter. A server that knows the expected shapes should
# pass its own, tighter limit; a larger model's full-weight uploads need a larger one.
MAX_ELEMENTS = 2**31
MAX_ENTRIES = 2**16  # tensors in one payload (a 400B model has ~1.1k weight tensors)
MAX_HEADER_BYTES = 2**24  # the inflated JSON description: ~250 bytes an entry at most
MAX_DIMS = 32  # dimensions of one tensor's shape
# what decoding a crafted payload can raise from numpy, torch, zlib, json and struct; turned
# into MalformedMessage by `guard`
DECODE_ERRORS = (ValueError, IndexError, KeyError, TypeError, AttributeError, OverflowError, ZeroDivisionError,
                 RecursionError, RuntimeError, zlib.error, struct.error)


def short(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def malformed(codec: str, name, what: str) -> MalformedMessage:
    """The one error for a bad message, on one line: codec, tensor, what is wrong."""
    where = f"{codec}: " + (f"tensor {short(name, 80)}: " if name is not None else "")
    return MalformedMessage(" ".join((where + what).split()))


def check(ok: bool, codec: str, name, what: str) -> None:
    if not ok:
        raise malformed(codec, name, what)


@contextmanager
def guard(codec: str, name=None):
    """Any error decoding untrusted bytes raises as MalformedMessage (a safety net behind the
    explicit checks, which come first and say more)."""
    try:
        yield
    except MalformedMessage:
        raise
    except DECODE_ERRORS as error:
        raise malformed(codec, name, f"{type(error).__name__}: {error}") from error


def max_elements(ctx) -> int:
    """The caller's bound on the elements a message may decode to (`ctx.max_elements`, where
    the context has one), else MAX_ELEMENTS."""
    limit = ctx.max_elements if ctx is not None else None  # decoding without a context: the ceiling
    return MAX_ELEMENTS if limit is None else int(limit)


def integer(info: dict, key: str, low: int, high: int, codec: str, name) -> int:
    """info[key], checked to be an int in [low, high]."""
    value = info.get(key) if isinstance(info, dict) else None
    check(type(value) is int and low <= value <= high, codec, name, f"'{key}' is {short(value)}, expected an integer in [{low}, {high}]")
    return value


def inflate(data: bytes, limit: int, codec: str) -> bytes:
    """zlib.decompress that stops at `limit` bytes out: a bomb fails without being inflated."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, limit)
    except zlib.error as error:
        raise malformed(codec, None, f"header does not inflate: {error}") from error
    check(not inflater.unconsumed_tail, codec, None, f"header inflates past {limit} bytes")
    check(inflater.eof, codec, None, "header is a truncated zlib stream")
    check(not inflater.unused_data, codec, None, f"{len(inflater.unused_data)} bytes after the header's zlib stream")
    return out


def check_entry(info, codec: str, limit: int) -> int:
    """Checks one entry's common fields (name, shape, dtype, byte count); returns its numel."""
    check(isinstance(info, dict), codec, None, f"an entry is {short(info)}, not an object")
    name = info.get("name")
    check(isinstance(name, str), codec, None, f"an entry's name is {short(name)}, not a string")
    shape = info.get("shape")
    check(isinstance(shape, list) and len(shape) <= MAX_DIMS, codec, name, f"shape {short(shape)} is not a list of at most {MAX_DIMS} sizes")
    size = 1
    for dim in shape:
        check(type(dim) is int and dim >= 0, codec, name, f"shape {short(shape)}: size {short(dim)} is not an integer ≥ 0")
        size *= dim
        check(size <= limit, codec, name, f"shape {short(shape)} has more than {limit} elements")
    check(isinstance(info.get("dtype"), str) and info["dtype"] in DTYPES, codec, name,
          f"dtype {short(info.get('dtype'))} is not one of {sorted(DTYPES)}")
    integer(info, "bytes", 0, 2**63, codec, name)
    return size


def numel(info: dict) -> int:
    """Elements of an entry `unpack` has checked."""
    return math.prod(info["shape"])


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


def unpack(message: Message, key: str, ctx=None) -> tuple[list[tuple[dict, bytes]], dict, dict]:
    """Inverse of `pack`: ([(description, bytes)], passthrough tensors, meta). The common
    fields of every description are checked (`check_entry`), the entries' byte counts must
    add up to the payload, and all entries together hold at most `max_elements(ctx)`."""
    if key not in message.tensors:
        raise malformed(key, None, f"the message has no '{key}' payload (was it encoded by this codec?)")
    payload = message.tensors[key]
    check(payload.dtype == torch.uint8 and payload.dim() == 1, key, None,
          f"payload is a {str(payload.dtype).removeprefix('torch.')} tensor of shape {list(payload.shape)}, expected 1-D uint8")
    data = payload.numpy().tobytes()
    check(len(data) >= 4, key, None, f"payload has {len(data)} bytes, too short for its header length")
    (size,) = struct.unpack("<I", data[:4])
    check(size <= len(data) - 4, key, None, f"header of {size} bytes overruns the {len(data)}-byte payload")
    text = inflate(data[4 : 4 + size], MAX_HEADER_BYTES, key)
    try:
        described = json.loads(text)
    except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise malformed(key, None, f"header is not JSON: {type(error).__name__}: {error}") from error
    check(isinstance(described, list) and len(described) <= MAX_ENTRIES, key, None,
          f"header is not a list of at most {MAX_ENTRIES} entries")
    passthrough = {k: t for k, t in message.tensors.items() if k != key}
    limit, total, names = max_elements(ctx), 0, set()
    entries, offset = [], 4 + size
    for info in described:
        total += check_entry(info, key, limit)
        name = info["name"]
        check(total <= limit, key, name, f"the message decodes to more than {limit} elements")
        check(name not in names and name not in passthrough and name != key, key, name, "name given twice")
        names.add(name)
        check(info["bytes"] <= len(data) - offset, key, name, f"its {info['bytes']} bytes overrun the {len(data)}-byte payload")
        entries.append((info, data[offset : offset + info["bytes"]]))
        offset += info["bytes"]
    check(offset == len(data), key, None, f"payload has {len(data)} bytes, its entries describe {offset}")
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

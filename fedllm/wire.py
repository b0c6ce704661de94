"""What travels between a client and the server: tensors + JSON metadata, serialized with
safetensors. Simulation really serializes and deserializes every message, so the server
sees only what a message carries, and the ledger counts real bytes."""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors


EXTRAS = "strategy/"  # a strategy's extra tensors travel in the same message under this prefix


def with_extras(tensors: dict, extras: dict) -> dict:
    """One message's tensors: the adapter's, then the strategy's under EXTRAS."""
    return {**tensors, **{EXTRAS + k: t for k, t in extras.items()}}


def split_extras(tensors: dict) -> tuple[dict, dict]:
    """(the adapter's tensors, the strategy's extras without the prefix)."""
    plain = {k: t for k, t in tensors.items() if not k.startswith(EXTRAS)}
    return plain, {k[len(EXTRAS):]: t for k, t in tensors.items() if k.startswith(EXTRAS)}


class MalformedMessage(ValueError):
    """A message from an untrusted party that does not decode to what its header promises
    (a codec header out of bounds, a payload of the wrong length, ...). The one error a
    decoder raises for bad input; its text names the codec, the tensor and what is wrong."""


class Erased(MalformedMessage):
    """A message a simulated lossy link dropped (codec noisy_link's erasures): nothing arrived."""


@dataclass
class Message:
    tensors: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class WireContext:
    round: int
    client_id: int
    seed: int
    # Client side only: this codec's per-client state (e.g. an error-feedback residual),
    # kept in the client store between the client's rounds; the codec edits it in place.
    # Decoding gets None: the server may use only what the message carries.
    state: dict | None = field(default=None, compare=False)
    # Server side: the most elements a decoded message may hold (from the global state), so a
    # crafted header cannot make the receiver allocate more; None: the codecs' own ceiling.
    max_elements: int | None = field(default=None, compare=False)


def serialize(message: Message) -> bytes:
    tensors = {k: t.detach().contiguous().cpu() for k, t in message.tensors.items()}
    return save_tensors(tensors, metadata={"fedllm": json.dumps(message.meta)} if message.meta else None)


def deserialize(data: bytes) -> Message:
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    meta = json.loads(header.get("__metadata__", {}).get("fedllm", "{}"))
    return Message(load_tensors(data), meta)


# safetensors lays tensors out by dtype (this order, largest first), then by name
_DTYPE_ORDER = ["BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64"]
_DTYPE_NAMES = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.float16: "F16",
    torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32", torch.float64: "F64", torch.int64: "I64",
}


def serialized_size(message: Message) -> int:
    """len(serialize(message)) without building the bytes: for a message as large as a
    full model, whose size the engine needs but whose bytes it must not materialise."""
    names = {k: _DTYPE_NAMES[t.dtype] for k, t in message.tensors.items()}
    order = sorted(message.tensors, key=lambda k: (-_DTYPE_ORDER.index(names[k]), k))
    header, offset = {}, 0
    if message.meta:
        header["__metadata__"] = {"fedllm": json.dumps(message.meta)}
    for k in order:
        t = message.tensors[k]
        size = t.numel() * t.element_size()
        header[k] = {"dtype": names[k], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = len(json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode())
    return 8 + -(-text // 8) * 8 + offset

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


def serialize(message: Message) -> bytes:
    tensors = {k: t.detach().contiguous().cpu() for k, t in message.tensors.items()}
    return save_tensors(tensors, metadata={"fedllm": json.dumps(message.meta)} if message.meta else None)


def deserialize(data: bytes) -> Message:
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    meta = json.loads(header.get("__metadata__", {}).get("fedllm", "{}"))
    return Message(load_tensors(data), meta)

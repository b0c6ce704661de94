"""The Channel's serialized bytes inside Flower records: one uint8 Array, which Flower
chunks for transport (no 2 GB gRPC limit), read back only if it is exactly that."""
from __future__ import annotations

from flwr.app import Array, ArrayRecord

STYPE = "fedllm/safetensors"  # the Array holds a fedllm wire message as it is, not a numpy array


def wire_record(wire: bytes) -> ArrayRecord:
    return ArrayRecord({"wire": Array(dtype="uint8", shape=(len(wire),), stype=STYPE, data=wire)})


def read_bytes(record: ArrayRecord) -> bytes:
    """The wire bytes of a record made by `wire_record`; ValueError for anything else."""
    if list(record.keys()) != ["wire"]:
        raise ValueError(f"expected one array 'wire', got {sorted(record.keys())[:3]}")
    array = record["wire"]
    if array.stype != STYPE or array.dtype != "uint8" or tuple(array.shape) != (len(array.data),):
        raise ValueError(f"the array is {array.stype}/{array.dtype}{tuple(array.shape)}, not {STYPE} bytes")
    return bytes(array.data)

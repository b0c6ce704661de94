"""Casting the uplink to 16-bit floats: half the bytes of fp32, decoded back to the original
dtype. fp16 keeps 10 mantissa bits but overflows past 65504 (an overflowing client sends
inf and the server drops it as non-finite); bf16 keeps fp32's range with 7 mantissa bits.
Integer tensors are left alone."""
from __future__ import annotations

import torch

import fedllm.codecs.framing as framing
from fedllm.codecs.base import Codec
from fedllm.codecs.framing import DTYPES
from fedllm.registry import CODECS
from fedllm.wire import Message


class Cast(Codec):
    dtype: torch.dtype
    key: str

    def encode(self, message: Message, ctx) -> Message:
        floating = {k: t for k, t in message.tensors.items() if t.is_floating_point()}
        original = {k: str(t.dtype).removeprefix("torch.") for k, t in floating.items()}
        if len(set(original.values())) == 1:  # the usual case: one dtype, named once
            original = {"*": next(iter(original.values()))}
        tensors = {k: t.to(self.dtype) if k in floating else t for k, t in message.tensors.items()}
        return Message(tensors, {**message.meta, self.key: original})

    def decode(self, message: Message, ctx) -> Message:
        """Checks the message against what `encode` sends: every float tensor in this codec's
        dtype with its original dtype (from DTYPES) in the meta, at most `max_elements(ctx)`
        float elements in all."""
        original = message.meta.get(self.key)
        framing.check(isinstance(original, dict) and len(original) <= framing.MAX_ENTRIES + 1
                      and all(isinstance(k, str) and isinstance(v, str) and v in DTYPES for k, v in original.items()),
                      self.key, None, f"meta '{self.key}' is {framing.short(original)}, not a map of names to {sorted(DTYPES)}")
        limit, total, tensors = framing.max_elements(ctx), 0, {}
        for k, t in message.tensors.items():
            dtype = original.get(k, original.get("*")) if t.is_floating_point() else None
            if t.is_floating_point():
                framing.check(t.dtype == self.dtype, self.key, k, f"is {str(t.dtype).removeprefix('torch.')}, expected {self.key}")
                framing.check(dtype is not None, self.key, k, "has no original dtype in the meta")
                total += t.numel()
                framing.check(total <= limit, self.key, k, f"the message decodes to more than {limit} elements")
            tensors[k] = t.to(DTYPES[dtype]) if dtype else t
        return Message(tensors, {k: v for k, v in message.meta.items() if k != self.key})


@CODECS.register("fp16")
class Fp16(Cast):
    """Sends every float tensor as fp16 (2 bytes per entry), restored on the server."""

    dtype, key = torch.float16, "fp16"


@CODECS.register("bf16")
class Bf16(Cast):
    """Sends every float tensor as bf16 (2 bytes per entry), restored on the server."""

    dtype, key = torch.bfloat16, "bf16"

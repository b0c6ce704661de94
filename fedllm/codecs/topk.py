"""Top-k sparsification with error feedback (Stich et al. 2018, "Sparsified SGD with
Memory"; Karimireddy et al. 2019, EF-SGD). Per tensor, the client sends the k = ⌈fraction·d⌉
largest-magnitude entries of its update plus its residual, and keeps what it did not send:

    a_t = u_t + e_{t−1},    sent_t = top_k(a_t),    e_t = a_t − sent_t

so Σ_t sent_t + e_T = Σ_t u_t: nothing is lost, only delayed. The residual e is client state,
kept in the client store between the client's rounds (the engine hands each codec its own
per-client state dict as `ctx.state`). Wire: the sorted indices in ⌈log2 d⌉ bits each,
then the values in fp32."""
from __future__ import annotations

import math

import numpy as np
import torch

import fedllm.codecs.framing as framing
from fedllm.codecs.base import Codec
from fedllm.codecs.bitstream import bit_width, pack_uints, unpack_uints
from fedllm.registry import CODECS
from fedllm.wire import Message


@CODECS.register("topk")
class TopK(Codec):
    """Top-k sparsification per tensor, with a per-client error-feedback residual."""

    def __init__(self, fraction: float = 0.01, error_feedback: bool = True):
        if not 0 < fraction <= 1:
            raise ValueError(f"topk: fraction must be in (0, 1], got {fraction}")
        self.fraction, self.error_feedback = fraction, error_feedback

    def encode(self, message: Message, ctx) -> Message:
        floating, passthrough = framing.split_floating(message)
        state = framing.client_state(ctx, "topk") if self.error_feedback else {}
        entries = []
        for name, t in floating.items():
            a = t.detach().cpu().float().reshape(-1)
            if name in state:
                a = a + state[name].reshape(-1)
            index = torch.topk(a.abs(), framing.kept_count(self.fraction, a.numel()), sorted=False).indices.sort().values
            if self.error_feedback:
                residual = a.clone()
                residual[index] = 0.0
                state[name] = residual.reshape(t.shape)
            data = pack_uints(index.numpy(), bit_width(a.numel())) + framing.floats_to_bytes(a[index])
            entries.append((framing.describe(name, t, count=int(index.numel())), data))
        return framing.pack(message, "topk", entries, passthrough)

    def decode(self, message: Message, ctx) -> Message:
        entries, tensors, meta = framing.unpack(message, "topk", ctx)
        for info, data in entries:
            name, size = info["name"], framing.numel(info)
            count = framing.integer(info, "count", 0, size, "topk", name)
            width = bit_width(size)
            split = math.ceil(count * width / 8)
            framing.check(len(data) == split + 4 * count, "topk", name,
                          f"{len(data)} bytes, {count} entries of {width}-bit index + fp32 value take {split + 4 * count}")
            with framing.guard("topk", name):
                index = unpack_uints(data[:split], width, count).astype(np.int64)
                framing.check(count == 0 or (bool((np.diff(index) > 0).all()) and 0 <= int(index[0]) and int(index[-1]) < size),
                              "topk", name, f"indices are not increasing and below {size}")
                dense = torch.zeros(size)
                dense[torch.from_numpy(index)] = framing.bytes_to_floats(data[split:])
                tensors[name] = framing.restore(dense, info)
        return Message(tensors, meta)

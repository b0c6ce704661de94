"""Channel(adapter, codecs): what a message is on the wire. Up: the adapter's encoding of an
update plus the strategy's extras, the codec chain (with each codec's per-client state),
real serialization, the bytes counted, and the server's decoding of exactly those bytes.
Down: the global state plus the strategy's broadcast as one real message. It takes exactly
its inputs, so the simulation, the Trainer callback and a networked client send the same
bytes."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Callable

import torch

from fedllm.adapters.base import Adapter
from fedllm.codecs.seeded import SeededDelta, Shapes, decode_seeded, is_seeded
from fedllm.state import State
from fedllm.strategies.base import Update
from fedllm.wire import (
    MalformedMessage, Message, WireContext, deserialize, serialize, serialized_size, split_extras, with_extras,
)


@dataclass
class Downlink:
    """x^t and the strategy's broadcast as a client holds them, and what each client downloads."""

    x_t: State
    broadcast: State
    bytes_for: Callable[[int], int]  # client id -> bytes it downloads to hold x^t this round


class Channel:
    """`shapes`: the names and shapes of the global state, which the server needs to rebuild
    a (seed, scalar) upload (fedllm.codecs.seeded); None: no such uploads."""

    def __init__(self, adapter: Adapter, codecs: list, shapes: Shapes | None = None):
        self.adapter, self.codecs, self.shapes = adapter, list(codecs), shapes

    # ---- client → server ---------------------------------------------------------------
    def encode(self, update: Mapping, extras: State, ctx: WireContext, codec_states: dict[int, State]) -> bytes:
        """The client's half: the bytes it sends. `codec_states` (codec index -> that codec's
        stored state for this client) is updated in place."""
        # a zeroth-order update travels as its seeds and scalars, whatever the adapter
        message = update.message() if isinstance(update, SeededDelta) else self.adapter.encode(update, ctx)
        message.tensors = with_extras(message.tensors, extras)
        for i, codec in enumerate(self.codecs):
            own = codec_states.setdefault(i, {})
            message = codec.encode(message, replace(ctx, state=own))
            if not own:
                del codec_states[i]
        return serialize(message)

    def decode(self, message: Message, ctx: WireContext, adapter_space: bool = False) -> Update | State:
        """The server's half, from the deserialized bytes alone: the decoded `Update`, or
        (`adapter_space`) the adapter's own wire tensors, for aggregation in its coordinates."""
        for codec in reversed(self.codecs):
            message = codec.decode(message, ctx)
        if adapter_space:
            return message.tensors
        plain, extras = split_extras(message.tensors)
        if is_seeded(message):
            return Update(decode_seeded(plain, self.shapes), extras)
        return Update(self.adapter.decode(Message(plain, message.meta), ctx), extras)

    def up(self, update: Mapping, extras: State, ctx: WireContext, codec_states: dict[int, State],
           adapter_space: bool = False) -> tuple[Update | State, int]:
        """Both halves, as the simulation runs them: what the server decodes, and the bytes."""
        wire = self.encode(update, extras, ctx, codec_states)
        size = len(wire)
        try:
            message = deserialize(wire)
            del wire  # for a full-parameter update, at most two full-size objects live at once
            return self.decode(message, ctx, adapter_space), size
        except MalformedMessage as err:
            err.bytes = size  # what the client sent is counted even when the server refuses it
            raise

    # ---- server → clients --------------------------------------------------------------
    def down(self, global_state: State, broadcast: State, device: torch.device, ctx: WireContext | None = None) -> Downlink:
        """The global state (+ the strategy's broadcast tensors) as real bytes, decoded as a
        client decodes them; every client downloads the same message. `ctx` (round, receiving
        client or -1 for the round's broadcast, seed) seeds what a codec's link does to it."""
        wire = self.down_wire(global_state, broadcast)
        x_t, broadcast_t = self.open_down(wire, ctx)
        size = len(wire)
        on_device = lambda state: {k: t.to(device) for k, t in state.items()}  # noqa: E731
        return Downlink(on_device(x_t), on_device(broadcast_t), lambda client_id: self.download_size(
            global_state, broadcast, client_id, size))

    def download_size(self, global_state: State, broadcast: State, client_id: int, shared: int) -> int:
        """Bytes `client_id` downloads: the shared message, or the part the adapter sends it."""
        own = self.adapter.client_download(global_state, client_id)
        if own is None:
            return shared
        message = self.adapter.encode_global(own)
        message.tensors = with_extras(message.tensors, broadcast)
        return serialized_size(message)

    def down_wire(self, global_state: State, broadcast: State) -> bytes:
        """The server's half of the download: the bytes every sampled client receives."""
        message = self.adapter.encode_global(global_state)
        message.tensors = with_extras(message.tensors, broadcast)
        return serialize(message)

    def open_down(self, wire: bytes, ctx: WireContext | None = None) -> tuple[State, State]:
        """The client's half: (x^t, the strategy's broadcast) from the downloaded bytes, as a
        simulated link (a codec's `down`) delivers them."""
        message = deserialize(wire)
        for codec in self.codecs:
            message = codec.down(message, ctx or WireContext(0, -1, 0))
        plain, broadcast = split_extras(message.tensors)
        return self.adapter.decode_global(Message(plain, message.meta)), broadcast

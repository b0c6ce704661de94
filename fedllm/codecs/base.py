"""The codec contract (see the package docstring): encode on the client, decode on the
server, and an optional privacy report."""
from __future__ import annotations

from fedllm.wire import Message


class Codec:
    # True: a randomized mechanism whose output is random for every float coordinate, a lone
    # 0/1 flag included (the others give such flags back exactly)
    randomizes = False

    def encode(self, message: Message, ctx) -> Message:
        raise NotImplementedError

    def decode(self, message: Message, ctx) -> Message:
        raise NotImplementedError

    def down(self, message: Message, ctx) -> Message:
        """What the download of round `ctx.round` becomes on its way to a client (a noisy
        link); identity for a codec of the uplink only."""
        return message

    def accounting(self, rounds_done: int) -> dict:
        """Privacy numbers logged after `rounds_done` rounds (e.g. RQM's ε); {} for none."""
        return {}

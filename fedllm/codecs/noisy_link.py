"""A simulated noisy link (the channel of Lari et al., arXiv 2409.13451, as their published
code github.com/ehsan-lari/RERCE_Fed simulates it: every transmitted model is received plus
zero-mean white Gaussian noise of a fixed variance — `noise_std` here — drawn independently
per client on the uplink and the downlink; packet erasures are ours).

For a message whose float entries x ∈ R^n (all its tensors together) have power
P = ‖x‖²/n, the receiver gets

    x̃ = x + n,    n ~ N(0, σ² I),    σ² = P / 10^(snr_db/10)

so the received signal-to-noise ratio is `snr_db` whatever the update's scale (a fixed σ
instead: `noise_std`). An uplink message is erased with probability `erasure`: the server
receives nothing and the client is dropped from the round (its bytes still count as sent;
the ledger row says `rejected: erased`).
`downlink: true` adds the same kind of noise to the global state (+ broadcast) each client
receives. Integer tensors (seeds, indices, counts) travel as a digital side channel: exact.

Deviations and choices: noise is added where the message is received (in `decode` and
`down`), so a client's codec state (error feedback) never sees it; it acts on the float
values as they reach this codec in decoding order — an analog link of the values, so list
it first (or alone) in `codecs:`. The engine's download is one broadcast per round, so its
noise is one draw shared by the round's clients (`Channel.down(..., client_id=i)` draws a
client's own, as the WLS reference test does). Every draw is seeded by (recipe seed, round,
client) under the "channel" stream: a run replays exactly. Measured totals (signal and noise
power per direction, erasures) are logged with every round (`channel_*` in metrics.jsonl)."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

import fedllm.codecs.framing as framing
from fedllm.codecs.base import Codec
from fedllm.registry import CODECS, RecipeError
from fedllm.seeds import derive
from fedllm.wire import Erased, Message

DOWNLINK = -1  # the client id of the round's broadcast draw


def is_float(t: torch.Tensor) -> bool:
    return t.is_floating_point()


def signal_power(tensors: dict[str, torch.Tensor]) -> tuple[float, int]:
    """(Σ x², n) over the float entries."""
    total, count = 0.0, 0
    for t in tensors.values():
        if is_float(t):
            total += float(t.double().square().sum())
            count += t.numel()
    return total, count


@CODECS.register("noisy_link")
class NoisyLink(Codec):
    """Simulated noisy link: additive Gaussian noise at a given SNR (uplink, downlink) and packet erasures."""

    randomizes = True

    def __init__(self, snr_db: Optional[float] = 20.0, noise_std: Optional[float] = None, uplink: bool = True,
                 downlink: bool = False, erasure: float = 0.0):
        if (snr_db is None) == (noise_std is None):
            raise RecipeError("noisy_link: give exactly one of snr_db (noise relative to the message) and noise_std")
        if noise_std is not None and noise_std < 0 or not 0.0 <= erasure < 1.0:
            raise RecipeError("noisy_link: noise_std must be ≥ 0 and erasure in [0, 1)")
        self.snr_db, self.noise_std, self.uplink, self.downlink, self.erasure = snr_db, noise_std, uplink, downlink, erasure
        # measured totals, per direction: [Σ signal², Σ noise², entries]; erasures, messages
        self.measured = {"up": [0.0, 0.0, 0], "down": [0.0, 0.0, 0]}
        self.erased = self.messages = 0

    def variance(self, power: float, count: int) -> float:
        if self.noise_std is not None:
            return self.noise_std**2
        return power / max(count, 1) / 10 ** (self.snr_db / 10)

    def corrupt(self, message: Message, rng: np.random.Generator, direction: str) -> Message:
        power, count = signal_power(message.tensors)
        std = math.sqrt(self.variance(power, count))
        noisy, noise_power = {}, 0.0
        for name in sorted(message.tensors):  # a deserialized message's order is not fixed; the draws' must be
            t = message.tensors[name]
            if not is_float(t) or std == 0.0:
                noisy[name] = t
                continue
            noise = torch.from_numpy(rng.standard_normal(t.numel())).reshape(t.shape).mul_(std)
            noise_power += float(noise.square().sum())
            noisy[name] = (t.double() + noise).to(t.dtype)
        totals = self.measured[direction]
        totals[0], totals[1], totals[2] = totals[0] + power, totals[1] + noise_power, totals[2] + count
        return Message(noisy, message.meta)

    def rng(self, ctx, client_id: int) -> np.random.Generator:
        return np.random.default_rng(derive(ctx.seed, ctx.round, client_id, tag="channel"))

    def encode(self, message: Message, ctx) -> Message:
        return message  # the link acts on what is received: see decode

    def decode(self, message: Message, ctx) -> Message:
        # the noise is drawn per float entry: an upload past the caller's bound gets none
        limit = framing.max_elements(ctx)
        floats = sum(t.numel() for t in message.tensors.values() if is_float(t))
        framing.check(floats <= limit, "noisy_link", None, f"the message decodes to more than {limit} elements")
        rng = self.rng(ctx, ctx.client_id)
        self.messages += 1
        if rng.random() < self.erasure:  # drawn first, so the noise does not depend on it
            self.erased += 1
            raise Erased("erased by the simulated noisy link (codec noisy_link, erasure)")
        return self.corrupt(message, rng, "up") if self.uplink else message

    def down(self, message: Message, ctx) -> Message:
        return self.corrupt(message, self.rng(ctx, ctx.client_id), "down") if self.downlink else message

    def accounting(self, rounds_done: int) -> dict:
        out = {"channel_erased": self.erased, "channel_messages": self.messages}
        for direction, (signal, noise, _) in self.measured.items():
            if noise > 0:
                out[f"channel_{direction}_snr_db"] = 10 * math.log10(signal / noise) if signal > 0 else -math.inf
        return out

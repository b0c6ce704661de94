"""Every random stream of a run derives from the recipe seed here, named by a tag, so that
ranks, resumed runs and the server draw the same numbers without talking to each other.
Each stream keeps the exact recipe its call site used before this module existed (salts,
text hashes, one plain sum): changing one would change every stored run that uses it."""
from __future__ import annotations

import hashlib

import numpy as np

# tag -> (form, salt words appended to [seed, *path]). Forms:
#   numpy:  np.random.SeedSequence([seed, *path, *salt]), for np.random.default_rng
#   torch:  the top 63 bits of that sequence's first 64-bit word (a torch or int64 seed)
#   mod64:  as torch, every word first reduced mod 2**64 (privacy allowed client -1)
#   sha256: the low 63 bits of sha256("tag:seed:path:..."), text so a path may name a module
#   sum:    seed + path, the one legacy stream that is not hashed
# Each stream has its own tag (and salt) so that no two uses of one seed draw the same numbers.
_STREAMS: dict[str, tuple[str, tuple[int, ...]]] = {
    "client": ("torch", ()),  # a local round's batch order and dropout, per (round, client)
    "sampler": ("numpy", ()),  # which clients a round samples, per round
    "poisson-sampler": ("numpy", (0x9015,)),  # the Poisson sampler's coins, one per client, per round
    "fedamd-anchor": ("numpy", (0xA4C,)),  # FedAMD's anchor/miner coin, per (round, client)
    "byzantine": ("numpy", (0xB1,)),  # which clients are attackers, once per run
    "poison": ("sum", ()),  # an attacker's data seed, seed + client id (collides across seeds)
    "label-flip": ("numpy", (0x1F,)),  # the response permutation, from the poison seed
    "data-sample": ("numpy", (1,)),  # data.max_samples' shuffle
    "eval-split": ("numpy", (2,)),  # the held-out eval rows
    "client-eval-split": ("numpy", (3,)),  # a client's own held-out rows (eval.per_client), per client
    "generate": ("torch", (0x6E,)),  # fedllm eval --generate's sampling
    "qsgd": ("numpy", (0x05D,)),  # QSGD's stochastic rounding, per (round, client + 1)
    "rqm": ("numpy", (0x2D3,)),  # RQM's kept levels, per (round, client + 1)
    "ferret": ("sha256", ()),  # one Ferret basis, per (pool seed, block)
    "ferret-pool": ("numpy", (0xFE77E7,)),  # Ferret's K pool seeds, per client, round or run
    "ferret-subset": ("numpy", (0xFE77E7,)),  # which pool seeds a block uses, per (round, client, group)
    "ffa-lora": ("sha256", ()),  # FFA-LoRA's frozen A, per module (WaRA's A: module "wara:<name>")
    "dp-sgd": ("mod64", (0x5D,)),  # DP-SGD's client noise under privacy.noise_seed, per (round, client)
    "dp-fedavg": ("mod64", (0xD9,)),  # DP-FedAvg's server noise under privacy.noise_seed
    "dp-brem": ("mod64", (0xB3E,)),  # DP-BREM's server noise under privacy.noise_seed
    "channel": ("mod64", (0xC4A,)),  # a simulated noisy link's noise and erasures, per (round, client; -1: downlink)
    "zo": ("numpy", (0x2E0,)),  # zeroth-order directions' seeds, per (round, client)
    "adversarial": ("torch", (0xAD7,)),  # the adversarial hook's random start, per (round, client, micro-batch, example)
    "devices": ("numpy", (0xDE7,)),  # simulated device speeds, once per run
    "availability": ("numpy", (0xA7A,)),  # a simulated device's online/offline periods, per client
    "available-sampler": ("numpy", (0xA75,)),  # a sync round's draw among the online clients, per round
}


def derive(seed: int, *path: int | str, tag: str) -> int | np.random.SeedSequence:
    """The seed of stream `tag` at `path` (e.g. round, client id, block, module name).

    Streams drawn with numpy return a `np.random.SeedSequence` (pass it to
    `np.random.default_rng`, or take words with `generate_state`); the others return a
    non-negative int for `torch.Generator.manual_seed` ("poison" is seed + client id).
    Unknown tags raise ValueError listing the known ones."""
    if tag not in _STREAMS:
        raise ValueError(f"unknown seed stream {tag!r}; known: {', '.join(_STREAMS)}")
    form, salt = _STREAMS[tag]
    if form == "sha256":
        return _hashed(":".join(str(v) for v in (tag, seed, *path)))
    if form == "sum":
        return seed + sum(path)
    words = [seed, *path, *salt]
    if form == "mod64":
        words = [int(w) % 2**64 for w in words]  # SeedSequence takes no negatives
    sequence = np.random.SeedSequence(words)
    if form == "numpy":
        return sequence
    return int(sequence.generate_state(1, np.uint64)[0] >> np.uint64(1))


def _hashed(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)

"""An update sent as (seed, scalar) pairs: its bytes are pinned (recorded before the message
moved out of the zeroth-order loop), the channel rebuilds it bit for bit from those bytes
alone, and a malformed pair list is refused before anything is regenerated."""
import hashlib

import pytest
import torch

from fedllm.adapters.base import Adapter
from fedllm.channel import Channel
from fedllm.codecs.seeded import COEFFS, MAX_PAIRS, SEEDS, SeededDelta, decode_seeded, reconstruct
from fedllm.wire import MalformedMessage, WireContext, serialize

SHAPES = {"a": (6, 5), "b": (20,)}
PAIRS = ([3, 2**62 + 1], [0.5, -0.25])


def delta() -> SeededDelta:
    seeds, coeffs = PAIRS
    return SeededDelta(reconstruct(seeds, coeffs, SHAPES), seeds, coeffs)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_the_message_and_its_rebuild_keep_their_recorded_bytes():
    wire = serialize(delta().message())
    assert len(wire) == 216 and digest(wire) == "7caa1bcc6cc0e74c63fe307c5b83160546bb01e7892ea5a16a208e493b3c8848"
    total = delta().total
    assert digest(b"".join(total[k].numpy().tobytes() for k in sorted(total))) == (
        "369a2d27a5c83019ad3033f2db02361efe3167e41a702ea6f32dc84b58eb0823")


def test_the_channel_rebuilds_the_update_from_the_bytes_alone():
    sent = delta()
    received, _ = Channel(Adapter(), [], SHAPES).up(sent, {"step": torch.tensor([1])}, WireContext(0, 1, 0), {})
    assert all(torch.equal(received.delta[k], sent[k]) for k in SHAPES)
    assert torch.equal(received.extras["step"], torch.tensor([1]))


def test_malformed_pairs_are_refused():
    seeds, coeffs = torch.tensor(PAIRS[0]), torch.tensor(PAIRS[1])
    with pytest.raises(MalformedMessage, match="not given the update's shapes"):
        decode_seeded({SEEDS: seeds, COEFFS: coeffs}, None)
    with pytest.raises(MalformedMessage, match="needs int64"):
        decode_seeded({SEEDS: seeds.int(), COEFFS: coeffs}, SHAPES)
    with pytest.raises(MalformedMessage, match="needs int64"):
        decode_seeded({SEEDS: seeds}, SHAPES)
    with pytest.raises(MalformedMessage, match="do not pair up"):
        decode_seeded({SEEDS: seeds, COEFFS: coeffs[:1]}, SHAPES)
    many = torch.zeros(MAX_PAIRS + 1, dtype=torch.int64)
    with pytest.raises(MalformedMessage, match=f"at most {MAX_PAIRS}"):
        decode_seeded({SEEDS: many, COEFFS: many.float()}, SHAPES)

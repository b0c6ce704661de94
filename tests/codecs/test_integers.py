"""Integer and bool tensors (Ferret's int64 seeds, int16/int32 indices and counts) ride
beside the float tensors untouched: every codec passes them through bit-exact, leaves them
out of its compressed payload and its state, and decodes the floats exactly as it would
without them."""

import pytest
import torch

from fedllm.adapters.base import Adapter
from fedllm.channel import Channel
from fedllm.registry import CODECS
from fedllm.wire import Message, WireContext, deserialize, serialize, with_extras

CODECS_UNDER_TEST = [
    {"name": "fedzip"},
    {"name": "fedzip", "keep": 1.0, "error_feedback": True},
    {"name": "topk", "fraction": 0.1},
    {"name": "qsgd", "levels": 7, "bucket_size": 64},
    {"name": "fp16"},
    {"name": "bf16"},
    {"name": "rqm", "clip": 0.5, "levels": 8},
]


def ferret_like_message() -> tuple[dict, dict]:
    """(float tensors, integer and bool tensors) shaped like a Ferret upload."""
    gen = torch.Generator().manual_seed(0)
    floats = {"coords": torch.randn(300, generator=gen), "extra": torch.randn(7, 5, generator=gen, dtype=torch.float64)}
    ints = {
        "seeds": torch.tensor([2**62 + 1, 2**62 - 3, -(2**62) + 7, 2**63 - 1], dtype=torch.int64),
        "index": torch.randint(-(2**15), 2**15, (40,), generator=gen, dtype=torch.int16),
        "counts": torch.randint(0, 2**31 - 1, (3, 4), generator=gen, dtype=torch.int32),
        "mask": torch.rand(9, generator=gen) < 0.5,
    }
    return floats, ints


def round_trip(codec, message: Message, state: dict) -> tuple[Message, Message, int]:
    """(encoded message, decoded message, bytes on the wire), through real serialization."""
    encoded = codec.encode(message, WireContext(2, 1, 0, state=state))
    wire = serialize(encoded)
    return encoded, codec.decode(deserialize(wire), WireContext(2, 1, 0)), len(wire)


@pytest.mark.parametrize("options", CODECS_UNDER_TEST, ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_integer_tensors_pass_every_codec_bit_exact_and_outside_its_payload(options):
    floats, ints = ferret_like_message()
    mixed_state, float_state = {}, {}
    encoded, decoded, mixed_bytes = round_trip(CODECS.build(options), Message({**floats, **ints}), mixed_state)
    alone, alone_decoded, float_bytes = round_trip(CODECS.build(options), Message(dict(floats)), float_state)
    for name, t in ints.items():  # on the wire as themselves, and back bit-exact
        for message in (encoded, decoded):
            assert message.tensors[name].dtype == t.dtype and torch.equal(message.tensors[name], t), name
    for name, t in floats.items():  # the floats decode exactly as without the integers beside them
        assert decoded.tensors[name].dtype == t.dtype and decoded.tensors[name].shape == t.shape
        assert torch.equal(decoded.tensors[name], alone_decoded.tensors[name]), name
    # the codec's own (compressed) tensors are the same bytes with or without the integers,
    # so nothing of the integers is counted as compressed, and the wire grows by their raw size
    for name, t in alone.tensors.items():
        assert torch.equal(encoded.tensors[name], t), name
    assert set(encoded.tensors) == set(alone.tensors) | set(ints)
    assert mixed_bytes - float_bytes >= sum(t.numel() * t.element_size() for t in ints.values())
    assert set(mixed_state) == set(float_state) <= set(floats)  # error-feedback residuals: floats only


def test_rqm_counts_only_float_coordinates():
    floats, ints = ferret_like_message()
    codec = CODECS.build({"name": "rqm", "clip": 0.5})
    round_trip(codec, Message({**floats, **ints}), {})
    assert codec.dimension == sum(t.numel() for t in floats.values())


def test_a_codec_chain_through_the_send_path_keeps_integers_exact():
    floats, ints = ferret_like_message()
    chain = [CODECS.build({"name": "fp16"}), CODECS.build({"name": "fedzip", "error_feedback": True})]
    received, _ = Channel(Adapter(), chain).up({**floats, **ints}, {"step": torch.tensor([5], dtype=torch.int64)}, WireContext(0, 0, 0), {})
    decoded = with_extras(received.delta, received.extras)  # named as on the wire
    for name, t in ints.items():
        assert decoded[name].dtype == t.dtype and torch.equal(decoded[name], t)
    assert torch.equal(decoded["strategy/step"], torch.tensor([5]))
    assert decoded["coords"].dtype == torch.float32 and decoded["extra"].dtype == torch.float64

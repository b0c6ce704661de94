"""Codecs chain in recipe order through the real channel (encode in order, real
bytes, decode in reverse), and integer tensors (and a strategy's extras) come through exact."""
import torch

from fedllm.adapters.base import Adapter
from fedllm.channel import Channel
from fedllm.codecs.fedzip import FedZip
from fedllm.registry import CODECS
from fedllm.wire import Message, WireContext, serialize, with_extras
from tests.codecs.test_contract import update


def test_a_chain_encodes_in_recipe_order_and_decodes_in_reverse():
    gen = torch.Generator().manual_seed(0)
    update = {"a": torch.randn(32, 8, generator=gen), "b": torch.randn(100, generator=gen)}
    extras = {"c": torch.randn(10, generator=gen)}
    chain = [CODECS.build({"name": "fp16"}), CODECS.build({"name": "fedzip", "keep": 0.5})]
    received, sent = Channel(Adapter(), chain).up({k: t.clone() for k, t in update.items()}, extras, WireContext(0, 0, 0), {})
    decoded = with_extras(received.delta, received.extras)  # named as on the wire
    assert set(decoded) == {"a", "b", "strategy/c"}
    zip_ = FedZip(keep=0.5)
    for name, original in {**update, "strategy/c": extras["c"]}.items():
        centroids, ids = zip_.quantize(original.half())  # fedzip saw the fp16 tensors
        expected = centroids[torch.from_numpy(ids)].half().float().reshape(original.shape)
        assert decoded[name].dtype == torch.float32 and torch.equal(decoded[name], expected)
    message = Message({**update, "strategy/c": extras["c"]})
    for codec in chain:
        message = codec.encode(message, WireContext(0, 0, 0))
    assert sent == len(serialize(message)) < 4 * 366 / 3  # the ledger counts the real bitstream: > 3× smaller than fp32


def test_a_codec_chain_through_the_send_path_keeps_integers_exact():
    floats, ints = update()
    chain = [CODECS.build({"name": "fp16"}), CODECS.build({"name": "fedzip", "error_feedback": True})]
    received, _ = Channel(Adapter(), chain).up({**floats, **ints}, {"step": torch.tensor([5], dtype=torch.int64)}, WireContext(0, 0, 0), {})
    decoded = with_extras(received.delta, received.extras)  # named as on the wire
    for name, t in ints.items():
        assert decoded[name].dtype == t.dtype and torch.equal(decoded[name], t)
    assert torch.equal(decoded["strategy/step"], torch.tensor([5]))
    assert decoded["a"].dtype == torch.float32 and decoded["b"].dtype == torch.float64

"""Top-k with error feedback, QSGD and 16-bit casting: what each sends and what comes back."""
import pytest
import torch

from fedllm.codecs.cast import Bf16, Fp16
from fedllm.codecs.qsgd import QSGD
from fedllm.codecs.topk import TopK
from fedllm.wire import Message, WireContext, deserialize, serialize


def send(codec, message, ctx):
    wire = serialize(codec.encode(message, ctx))
    return codec.decode(deserialize(wire), WireContext(ctx.round, ctx.client_id, ctx.seed)), len(wire)


def test_topk_sends_the_k_largest_entries_of_each_tensor():
    x = torch.randn(50, 20, generator=torch.Generator().manual_seed(0))
    decoded, wire = send(TopK(fraction=0.1, error_feedback=False), Message({"w": x}), WireContext(0, 0, 0))
    sent = decoded.tensors["w"]
    assert int((sent != 0).sum()) == 100 and torch.equal(sent[sent != 0], x[sent != 0])
    assert x[sent == 0].abs().max() <= x[sent != 0].abs().min()
    assert wire < 100 * (10 + 32) / 8 + 250  # 10-bit indices + fp32 values + framing


def test_error_feedback_loses_nothing_only_delays_it():
    gen = torch.Generator().manual_seed(1)
    codec, ctx = TopK(fraction=0.05), WireContext(0, 3, 0, state={})
    updates = [{"a": torch.randn(40, 10, generator=gen), "b": torch.randn(77, generator=gen)} for _ in range(6)]
    sent = {"a": torch.zeros(40, 10), "b": torch.zeros(77)}
    for t, update in enumerate(updates):
        decoded, _ = send(codec, Message(dict(update)), WireContext(t, 3, 0, state=ctx.state))
        for k in sent:
            sent[k] += decoded.tensors[k]
    for k in sent:  # Σ sent_t + e_T = Σ u_t
        torch.testing.assert_close(sent[k] + ctx.state[k], sum(u[k] for u in updates), rtol=0, atol=1e-5)
    assert ctx.state["a"].abs().sum() > 0  # something is still owed


def test_error_feedback_without_client_state_says_how_to_fix_it():
    with pytest.raises(RuntimeError, match="error_feedback: false"):
        TopK().encode(Message({"w": torch.ones(10)}), WireContext(0, 0, 0))


def test_qsgd_is_unbiased_and_sends_its_bits():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    codec = QSGD(levels=3, bucket_size=100)
    draws = torch.stack([send(codec, Message({"w": x}), WireContext(r, 0, 0))[0].tensors["w"] for r in range(400)])
    # each draw sits on the grid ‖v‖·ℓ/s of its bucket ...
    norms = x.reshape(10, 100).norm(dim=1, keepdim=True)
    levels = draws[0].reshape(10, 100) / norms * 3
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)
    # ... and the mean of draws converges to x (per-entry std ≤ ‖v‖/(2s) per draw)
    assert (draws.mean(0) - x).abs().max() < 5 * norms.max() / 6 / 400**0.5
    _, wire = send(codec, Message({"w": x}), WireContext(0, 0, 0))
    assert wire < 1000 * 3 / 8 + 10 * 4 + 250  # 7 symbols: 3 bits each, one fp32 norm per bucket


@pytest.mark.parametrize("codec, dtype", [(Fp16(), torch.float16), (Bf16(), torch.bfloat16)])
def test_casting_halves_the_bytes_and_restores_the_dtype(codec, dtype):
    x = torch.randn(4096, generator=torch.Generator().manual_seed(3))
    message = Message({"w": x, "ids": torch.arange(3)})
    decoded, wire = send(codec, message, WireContext(0, 0, 0))
    assert decoded.tensors["w"].dtype == torch.float32 and torch.equal(decoded.tensors["w"], x.to(dtype).float())
    assert torch.equal(decoded.tensors["ids"], torch.arange(3))
    assert wire < 2 * 4096 + 3 * 8 + 250 < len(serialize(message)) / 1.9

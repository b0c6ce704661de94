"""The codec contract, one row per codec × shared checks (the pattern of
tests/adapters/test_contract.py): every registered codec needs a row, and the matrix fails
until it has one. For every row, through real bytes and a separate decoding instance:

- round trip: the decoded update is within the row's tolerance of the sent one (bit for bit
  at tolerance 0); integer and bool tensors ride beside the floats bit-exact, outside the
  codec's payload and its per-client state, and the floats decode exactly as without them;
- bounded decode: a message past the caller's `max_elements` is refused with
  MalformedMessage, fast and without a large allocation (crafted bytes: test_untrusted.py,
  over these rows);
- accounting: `accounting(rounds)` reports finite numbers under the row's keys only;
- seeding: the same context gives the same bytes; a codec that draws randomness draws anew
  for another seed, round or client, and the others ignore the context; a codec alters a
  lone 0/1 flag exactly when it declares `randomizes`."""
import math
import resource
import time
import tracemalloc
from dataclasses import dataclass, replace

import pytest
import torch

from fedllm.registry import CODECS
from fedllm.wire import MalformedMessage, Message, WireContext, deserialize, serialize


@dataclass(frozen=True)
class Row:
    id: str
    options: dict  # the codec's recipe entry
    # the largest relative L2 error of a decoded float tensor (0: bit for bit); for a row that
    # draws, of the mean of DRAWS decodes (its codecs are unbiased: one draw says little)
    tolerance: float
    draws: bool = False  # its numbers come from the (seed, round, client) stream
    accounting: frozenset = frozenset()  # the keys `accounting` reports after a round trip
    packed: bool = False  # its payload is one framed uint8 tensor named after it (fedllm.codecs.framing)


DRAWS = 256
ROWS = [
    # fedzip and topk: what sparsifying and quantizing this message loses, with some margin
    Row("fedzip", {"name": "fedzip", "keep": 0.3}, 0.6, packed=True),
    Row("fedzip-ef", {"name": "fedzip", "keep": 1.0, "error_feedback": True}, 0.5, packed=True),
    Row("topk", {"name": "topk", "fraction": 0.1, "error_feedback": False}, 0.8, packed=True),
    Row("topk-ef", {"name": "topk", "fraction": 0.1}, 0.8, packed=True),
    Row("qsgd", {"name": "qsgd", "levels": 2, "bucket_size": 16}, 0.1, draws=True, packed=True),
    Row("rqm", {"name": "rqm", "clip": 0.5, "levels": 5}, 0.5, draws=True, packed=True,
        accounting=frozenset({"rqm_epsilon_coordinate", "rqm_delta", "rqm_epsilon"})),
    Row("fp16", {"name": "fp16"}, 2**-11),  # the formats' unit roundoff
    Row("bf16", {"name": "bf16"}, 2**-8),
    Row("noisy_link", {"name": "noisy_link", "snr_db": 20.0}, 0.02, draws=True,  # 10^(−20/20) / √DRAWS = 0.006
        accounting=frozenset({"channel_erased", "channel_messages", "channel_up_snr_db"})),
]
rows = pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
CTX = WireContext(0, 0, 0)


def update() -> tuple[dict, dict]:
    """(float tensors, integer and bool tensors) shaped like a Ferret upload, within RQM's clip."""
    gen = torch.Generator().manual_seed(0)
    floats = {"a": 0.1 * torch.randn(300, generator=gen), "b": 0.1 * torch.randn(7, 5, generator=gen, dtype=torch.float64)}
    ints = {
        "seeds": torch.tensor([2**62 + 1, 2**62 - 3, -(2**62) + 7, 2**63 - 1], dtype=torch.int64),
        "index": torch.randint(-(2**15), 2**15, (40,), generator=gen, dtype=torch.int16),
        "counts": torch.randint(0, 2**31 - 1, (3, 4), generator=gen, dtype=torch.int32),
        "mask": torch.rand(9, generator=gen) < 0.5,
    }
    return floats, ints


def message() -> Message:
    floats, ints = update()
    return Message({**floats, **ints})


def encoded(options: dict, sent: Message | None = None) -> Message:
    """A valid message encoded by the codec of `options`, through real bytes."""
    codec = CODECS.build(options)
    return deserialize(serialize(codec.encode(sent or message(), WireContext(0, 0, 0, state={}))))


def refused(options: dict, sent: Message, match: str, ctx=CTX, peak_mb: float = 32) -> str:
    """Decoding raises MalformedMessage matching `match`, in under a second and without a
    large allocation (tracemalloc sees numpy and Python; max RSS would grow by a forgotten
    torch allocation of the sizes these tests claim)."""
    codec = CODECS.build(options)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(MalformedMessage, match=match) as error:
            codec.decode(sent, ctx)
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 1.0, elapsed
    assert peak < peak_mb * 2**20, peak
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 256 * 1024  # KiB on Linux
    text = str(error.value)
    assert "\n" not in text and text.startswith(f"{options['name']}: "), text
    return text


def round_trip(codec, sent: Message, state: dict, ctx=WireContext(2, 1, 0), server=None) -> tuple[Message, Message, int]:
    """(encoded message, decoded message, bytes on the wire), through real serialization."""
    encoded_ = codec.encode(sent, replace(ctx, state=state))
    wire = serialize(encoded_)
    return encoded_, (server or codec).decode(deserialize(wire), ctx), len(wire)


def fedllm_codecs() -> list[str]:
    """The codecs fedllm registers (a test may register its own, e.g. a codec that sends NaN)."""
    return [name for name in CODECS.names() if CODECS.get(name).__module__.startswith("fedllm.")]


def test_every_registered_codec_has_a_documented_row():
    assert len({r.id for r in ROWS}) == len(ROWS)
    assert sorted({r.options["name"] for r in ROWS}) == fedllm_codecs()
    for name in fedllm_codecs():
        assert CODECS.get(name).__doc__.strip(), name


# ---- round trip ----------------------------------------------------------------------------
@rows
def test_the_update_comes_back_within_the_rows_tolerance(row):
    floats, _ = update()
    total = {k: torch.zeros(t.shape, dtype=torch.float64) for k, t in floats.items()}
    draws = DRAWS if row.draws else 1
    for client in range(draws):
        server = CODECS.build(row.options)  # decoding may use only the bytes
        _, decoded, _ = round_trip(CODECS.build(row.options), message(), {}, WireContext(0, client, 0), server)
        for k, t in floats.items():
            assert decoded.tensors[k].dtype == t.dtype and decoded.tensors[k].shape == t.shape, k
            total[k] += decoded.tensors[k].double()
    for k, t in floats.items():
        error = float((total[k] / draws - t.double()).norm() / t.double().norm())
        assert error <= row.tolerance, (k, error)


@rows
def test_integer_tensors_pass_bit_exact_and_outside_the_payload(row):
    floats, ints = update()
    mixed_state, float_state = {}, {}
    encoded_, decoded, mixed_bytes = round_trip(CODECS.build(row.options), Message({**floats, **ints}), mixed_state)
    alone, alone_decoded, float_bytes = round_trip(CODECS.build(row.options), Message(dict(floats)), float_state)
    for name, t in ints.items():  # on the wire as themselves, and back bit-exact
        for sent in (encoded_, decoded):
            assert sent.tensors[name].dtype == t.dtype and torch.equal(sent.tensors[name], t), name
    for name, t in floats.items():  # the floats decode exactly as without the integers beside them
        assert decoded.tensors[name].dtype == t.dtype and decoded.tensors[name].shape == t.shape
        assert torch.equal(decoded.tensors[name], alone_decoded.tensors[name]), name
    # the codec's own (compressed) tensors are the same bytes with or without the integers,
    # so nothing of the integers is counted as compressed, and the wire grows by their raw size
    for name, t in alone.tensors.items():
        assert torch.equal(encoded_.tensors[name], t), name
    assert set(encoded_.tensors) == set(alone.tensors) | set(ints)
    assert mixed_bytes - float_bytes >= sum(t.numel() * t.element_size() for t in ints.values())
    assert set(mixed_state) == set(float_state) <= set(floats)  # error-feedback residuals: floats only


# ---- bounded decode ------------------------------------------------------------------------
@rows
def test_a_valid_message_decodes_within_a_limit_and_not_past_it(row):
    sent = encoded(row.options)
    floats, ints = update()
    limit = sum(t.numel() for t in floats.values())  # integer tensors are not counted
    decoded = CODECS.build(row.options).decode(sent, WireContext(0, 0, 0, max_elements=limit))
    assert {k: t.shape for k, t in decoded.tensors.items()} == {k: t.shape for k, t in {**floats, **ints}.items()}
    assert decoded.tensors["b"].dtype == torch.float64 and torch.equal(decoded.tensors["seeds"], ints["seeds"])
    refused(row.options, sent, f"more than {limit - 1} elements", WireContext(0, 0, 0, max_elements=limit - 1))


# ---- accounting ----------------------------------------------------------------------------
@rows
def test_accounting_reports_finite_numbers_under_the_rows_keys(row):
    server = CODECS.build(row.options)
    round_trip(CODECS.build(row.options), message(), {}, server=server)
    for rounds in (1, 10):
        report = server.accounting(rounds)
        assert set(report) == row.accounting, report
        assert all(type(v) in (int, float) and math.isfinite(v) for v in report.values()), report


# ---- seeding -------------------------------------------------------------------------------
def sent_and_received(row, ctx: WireContext) -> bytes:
    encoded_, decoded, _ = round_trip(CODECS.build(row.options), message(), {}, ctx, CODECS.build(row.options))
    return serialize(encoded_) + serialize(decoded)


@rows
def test_a_context_replays_and_only_a_drawing_codec_depends_on_it(row):
    ctx = WireContext(3, 2, 5)
    torch.manual_seed(1)  # a differently used global RNG must not matter
    first = sent_and_received(row, ctx)
    torch.manual_seed(2)
    torch.rand(5)
    assert sent_and_received(row, ctx) == first
    for other in (replace(ctx, seed=6), replace(ctx, round=4), replace(ctx, client_id=1)):
        assert (sent_and_received(row, other) != first) == row.draws, other


@rows
def test_only_a_randomizing_codec_alters_a_lone_flag(row):
    codec, exact = CODECS.build(row.options), True
    for trial in range(10):
        for flag in (0.0, 1.0):
            sent = Message({"x": torch.randn(300), "strategy/miner": torch.tensor([flag])})
            back = codec.decode(codec.encode(sent, WireContext(trial, 1, 0, state={})), WireContext(trial, 1, 0))
            exact &= float(back.tensors["strategy/miner"]) == flag
    assert exact != codec.randomizes

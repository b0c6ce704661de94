"""Decoding untrusted bytes is bounded: a crafted header (huge shape, counts out of range, a
bad dtype, a bit width out of range, a truncated payload, a zlib bomb) raises
MalformedMessage before anything large is allocated, fast and in little memory; the caller's
`ctx.max_elements` bounds what a message may decode to; and random byte flips in a valid
payload never raise anything else."""
import json
import resource
import struct
import time
import tracemalloc
import zlib
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import fedllm.codecs.framing as framing
from fedllm.codecs.bitstream import pack_uints
from fedllm.registry import CODECS
from fedllm.wire import MalformedMessage, Message, WireContext, deserialize, serialize

CTX = WireContext(0, 0, 0)
PACKED = {  # the codecs whose payload is one framed uint8 tensor
    "fedzip": {"name": "fedzip", "keep": 0.3},
    "topk": {"name": "topk", "fraction": 0.1, "error_feedback": False},
    "qsgd": {"name": "qsgd", "levels": 2, "bucket_size": 16},
    "rqm": {"name": "rqm", "clip": 0.5, "levels": 5},
}
ALL = {**PACKED, "fp16": {"name": "fp16"}, "bf16": {"name": "bf16"}}


@dataclass(frozen=True)
class LimitedContext(WireContext):
    max_elements: int | None = None  # read by framing.max_elements


def tensors() -> dict:
    gen = torch.Generator().manual_seed(0)
    return {"a": torch.randn(300, generator=gen), "b": torch.randn(7, 5, generator=gen, dtype=torch.float64),
            "seeds": torch.tensor([3, 1, 4], dtype=torch.int64)}


def encoded(name: str, message: Message | None = None) -> Message:
    """A valid message encoded by codec `name`, through real bytes."""
    codec = CODECS.build(ALL[name])
    return deserialize(serialize(codec.encode(message or Message(tensors()), WireContext(0, 0, 0, state={}))))


def header_and_body(message: Message, key: str) -> tuple[list, bytes]:
    data = message.tensors[key].numpy().tobytes()
    (size,) = struct.unpack("<I", data[:4])
    return json.loads(zlib.decompress(data[4 : 4 + size])), data[4 + size :]


def framed(message: Message, key: str, header, body: bytes, raw_header: bytes | None = None) -> Message:
    """`message` with its payload replaced by `header` (a JSON value) and `body`."""
    compressed = raw_header if raw_header is not None else zlib.compress(json.dumps(header).encode())
    payload = bytearray(struct.pack("<I", len(compressed)) + compressed + body)
    return Message({**message.tensors, key: torch.frombuffer(payload, dtype=torch.uint8)}, dict(message.meta))


def refused(codec_name: str, message: Message, match: str, ctx=CTX, peak_mb: float = 32, options: dict | None = None):
    """Decoding raises MalformedMessage matching `match`, in under a second and without a
    large allocation (tracemalloc sees numpy and Python; max RSS would grow by a forgotten
    torch allocation of the sizes these tests claim)."""
    codec = CODECS.build(options or ALL[codec_name])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(MalformedMessage, match=match) as error:
            codec.decode(message, ctx)
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 1.0, elapsed
    assert peak < peak_mb * 2**20, peak
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 256 * 1024  # KiB on Linux
    text = str(error.value)
    assert "\n" not in text and text.startswith(f"{codec_name}: "), text
    return text


# ---- a valid round trip still works, and the caller's limit holds -------------------------------
@pytest.mark.parametrize("name", list(ALL))
def test_a_valid_message_decodes_within_a_limit_and_not_past_it(name):
    message = encoded(name)
    floats = 300 + 35
    decoded = CODECS.build(ALL[name]).decode(message, LimitedContext(0, 0, 0, max_elements=floats))
    assert {k: t.shape for k, t in decoded.tensors.items()} == {k: t.shape for k, t in tensors().items()}
    assert decoded.tensors["b"].dtype == torch.float64 and torch.equal(decoded.tensors["seeds"], tensors()["seeds"])
    refused(name, message, f"more than {floats - 1} elements", LimitedContext(0, 0, 0, max_elements=floats - 1))


# ---- the framing every packed codec shares ----------------------------------------------------
def bomb() -> bytes:
    """A valid zlib stream of ~1 MB that inflates to 1 GiB of spaces: 64 identical deflate
    segments of 16 MiB each (a full flush resets the history, so each segment is the same
    bytes), then the final block and the Adler-32 of the whole."""
    chunk = b" " * 2**24
    c = zlib.compressobj(9)
    head = c.compress(b"")
    segment = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)
    adler = 1
    for _ in range(64):
        adler = zlib.adler32(chunk, adler)
    return head + segment * 64 + b"\x03\x00" + struct.pack(">I", adler)


@pytest.fixture(scope="module")
def zlib_bomb():
    data = bomb()
    inflater = zlib.decompressobj()
    assert len(data) < 2**21 and len(inflater.decompress(data, 2**25)) == 2**25 and inflater.unconsumed_tail
    return data


@pytest.mark.parametrize("name", list(PACKED))
def test_framing_refuses_crafted_headers(name, zlib_bomb):
    message = encoded(name)
    header, body = header_and_body(message, name)
    first = header[0]

    def with_first(**fields):
        return framed(message, name, [{**first, **fields}] + header[1:], body)

    refused(name, with_first(shape=[10**12]), r"more than 2147483648 elements")
    refused(name, with_first(shape=[2**20, 2**20, 2**20]), r"more than 2147483648 elements")
    refused(name, with_first(shape=[10**6]), r"more than 1000 elements", LimitedContext(0, 0, 0, max_elements=1000))
    refused(name, with_first(shape=[-1]), r"not an integer ≥ 0")
    refused(name, with_first(shape=[3.0, 100]), r"not an integer ≥ 0")
    refused(name, with_first(shape=[1] * 100), r"at most 32 sizes")
    refused(name, with_first(dtype="int64"), r"dtype 'int64' is not one of")
    refused(name, with_first(dtype="object"), r"dtype 'object' is not one of")
    refused(name, with_first(bytes=-5), r"'bytes' is -5")
    refused(name, with_first(bytes=10**15), r"overrun")
    refused(name, with_first(name="seeds"), r"name given twice")
    refused(name, with_first(name=None), r"name is None")
    refused(name, framed(message, name, header + [first], body), r"name given twice")
    refused(name, framed(message, name, header, body[:-1]), r"its entries describe|overrun")  # truncated payload
    refused(name, framed(message, name, header, body + b"\0"), r"payload has .* bytes, its entries describe")
    refused(name, framed(message, name, [0] * 70_000, body), r"at most 65536 entries")
    refused(name, framed(message, name, {"a": 1}, body), r"not a list")
    refused(name, framed(message, name, None, body, raw_header=b"not zlib"), r"does not inflate")
    refused(name, framed(message, name, None, body, raw_header=zlib.compress(b"[1,")), r"not JSON")
    refused(name, framed(message, name, None, body, raw_header=zlib.compress(b"[" * 100_000)), r"not JSON")
    refused(name, framed(message, name, None, body, raw_header=zlib.compress(b"[]")[:-3]), r"truncated")
    refused(name, framed(message, name, None, body, raw_header=zlib_bomb), r"inflates past 16777216 bytes", peak_mb=64)
    data = message.tensors[name].numpy().tobytes()
    refused(name, Message({**message.tensors, name: torch.tensor(list(data[:3]), dtype=torch.uint8)}), r"too short")
    refused(name, Message({**message.tensors, name: torch.frombuffer(bytearray(struct.pack("<I", 2**31) + data[4:]), dtype=torch.uint8)}),
            r"overruns")
    refused(name, Message({**message.tensors, name: torch.zeros(10)}), r"expected 1-D uint8")
    refused(name, Message({k: t for k, t in message.tensors.items() if k != name}), r"no '.*' payload")


# ---- each codec's own fields ---------------------------------------------------------------------
def single(name: str, x: torch.Tensor) -> tuple[Message, dict, bytes]:
    message = encoded(name, Message({"w": x}))
    (info,), body = header_and_body(message, name)
    return message, info, body


def test_topk_refuses_counts_and_indices_out_of_range():
    message, info, body = single("topk", torch.arange(1.0, 6.0))  # 5 entries: one kept, 3-bit index
    assert info["count"] == 1

    def crafted(data=body, **fields):
        return framed(message, "topk", [{**info, "bytes": len(data), **fields}], data)

    refused("topk", crafted(count=10**12), r"'count' is 1000000000000, expected an integer in \[0, 5\]")
    refused("topk", crafted(count=-1), r"'count' is -1")
    refused("topk", crafted(count="1"), r"'count' is '1'")
    refused("topk", crafted(count=5), r"5 entries of 3-bit index \+ fp32 value take 22")
    refused("topk", crafted(body[:-1]), r"bytes, 1 entries")
    refused("topk", crafted(pack_uints(np.array([7]), 3) + body[1:]), r"indices are not increasing and below 5")
    two = pack_uints(np.array([3, 1]), 3) + body[1:] + body[1:]
    refused("topk", crafted(two, count=2), r"indices are not increasing")


def test_qsgd_refuses_lengths_and_levels_out_of_range():
    message, info, body = single("qsgd", torch.randn(20, generator=torch.Generator().manual_seed(1)))  # 2 buckets of 16
    assert len(body) == 2 * 4 + 32 * 3 // 8
    refused("qsgd", framed(message, "qsgd", [{**info, "shape": [40]}], body), r"3 buckets of 16 take 30")
    refused("qsgd", framed(message, "qsgd", [info], body[:-1] + b"\x7f"), r"a level is outside \[-2, 2\]")


def test_rqm_refuses_lengths_and_levels_out_of_range():
    message, info, body = single("rqm", torch.zeros(8))  # 5 levels: 3 bits each
    assert len(body) == 3
    refused("rqm", framed(message, "rqm", [{**info, "shape": [9]}], body), r"9 levels of 3 bits take 4")
    refused("rqm", framed(message, "rqm", [info], b"\xff" * 3), r"a level index is not below 5")


def fedzip_entry(encoding: str, x: torch.Tensor | None = None, clusters: int = 3):
    codec = CODECS.build({"name": "fedzip", "keep": 0.3, "encoding": encoding, "clusters": clusters})
    x = torch.randn(200, generator=torch.Generator().manual_seed(2)) if x is None else x
    message = deserialize(serialize(codec.encode(Message({"w": x}), CTX)))
    (info,), body = header_and_body(message, "fedzip")
    return message, info, body


def test_fedzip_refuses_bad_huffman_codes():
    message, info, body = fedzip_entry("huffman")

    def crafted(data=body, **fields):
        return framed(message, "fedzip", [{**info, "bytes": len(data), **fields}], data)

    assert info["enc"] == "huffman" and sorted(info["lengths"]) == [1, 2, 2]
    refused("fedzip", crafted(enc="lz4"), r"encoding 'lz4' is not one of")
    refused("fedzip", crafted(lengths=[1, 2]), r"not 3 integers in \[0, 64\]")
    refused("fedzip", crafted(lengths=[1, 2, 65]), r"not 3 integers in \[0, 64\]")  # bit width out of range
    refused("fedzip", crafted(lengths=[1, 2, -1]), r"not 3 integers")
    refused("fedzip", crafted(lengths=[1] * 10**5), r"not 3 integers")
    refused("fedzip", crafted(lengths=[2, 2, 2]), r"not a complete prefix code")
    refused("fedzip", crafted(lengths=[1, 1, 1]), r"not a complete prefix code")
    refused("fedzip", crafted(lengths=[1, 64, 64]), r"not a complete prefix code")
    refused("fedzip", crafted(shape=[10**6]), r"cannot hold 1000000 Huffman codes")
    refused("fedzip", crafted(body + b"\0"), r"bytes after its 200 symbols")
    refused("fedzip", crafted(body[:-1]), r"symbols, expected 200")
    refused("fedzip", crafted(body[:5]), r"too short for 3 fp32 centroids")


@pytest.mark.parametrize("encoding", ["position", "gap"])
def test_fedzip_refuses_bad_sparse_encodings(encoding):
    message, info, body = fedzip_entry(encoding)
    count = info["count"]

    def crafted(data=body, **fields):
        return framed(message, "fedzip", [{**info, "bytes": len(data), **fields}], data)

    refused("fedzip", crafted(count=10**12), r"'count' is 1000000000000, expected an integer in \[0, 200\]")
    refused("fedzip", crafted(count=-3), r"'count' is -3")
    refused("fedzip", crafted(majority=3), r"'majority' is 3, expected an integer in \[0, 2\]")
    refused("fedzip", crafted(body + b"\0"), r"bytes, (position|gap) encoding of")
    refused("fedzip", crafted(body[:-1]), r"bytes, (position|gap) encoding of")
    # a huge dense tensor that the sparse encodings would make cheap to ask for
    refused("fedzip", crafted(shape=[2**40]), r"more than 2147483648 elements")
    refused("fedzip", crafted(shape=[10**7]), r"more than 10000 elements", LimitedContext(0, 0, 0, max_elements=10_000))
    if encoding == "gap":
        refused("fedzip", crafted(rice=63), r"'rice' is 63, expected an integer in \[0, 62\]")  # bit width out of range
        refused("fedzip", crafted(rice=-1), r"'rice' is -1")
        refused("fedzip", crafted(gap_bytes=len(body)), r"'gap_bytes' is")
        # one gap of 10^6 in a 10-entry tensor: in range of the stream, not of the tensor
        runs = b"\xff" * 125 + b"\x00"  # 1000 ones then zeros: unary quotient 1000 with rice 0
        framed_gap = framed(message, "fedzip", [{**info, "shape": [10], "count": 1, "rice": 0, "gap_bytes": len(runs), "bytes": 12 + len(runs) + 1}],
                            body[:12] + runs + b"\0")
        refused("fedzip", framed_gap, r"exceeds 10")
    else:
        width = 8  # ⌈log2 200⌉
        refused("fedzip", crafted(body[:12] + pack_uints(np.full(count, 255), width) + body[12 + count:]),
                r"positions are not increasing indices below 200")
        # 4 clusters: the 3 minority ids take 2 bits, and 3 is not one of them
        message, info, body = fedzip_entry(encoding, clusters=4)
        count = info["count"]
        refused("fedzip", framed(message, "fedzip", [info], body[:16 + count] + b"\xff" * (len(body) - 16 - count)),
                r"a minority id is not below 3", options={"name": "fedzip", "clusters": 4})


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_casts_refuse_bad_meta_and_unexpected_tensors(name):
    message = encoded(name)
    meta = message.meta[name]

    def crafted(meta_value=..., **tensors_):
        m = {**message.meta}
        if meta_value is ...:
            m.pop(name)
        else:
            m[name] = meta_value
        return Message({**message.tensors, **tensors_}, m)

    refused(name, crafted(), r"meta '.*' is None")
    refused(name, crafted({"*": "int64"}), r"not a map of names to")
    refused(name, crafted({"*": "float32", "x": 3}), r"not a map of names to")
    refused(name, crafted(["float32"]), r"not a map of names to")
    refused(name, crafted(meta, c=torch.zeros(4)), r"tensor 'c': is float32, expected")
    refused(name, crafted({"a": "float32"}), r"tensor 'b': has no original dtype")


# ---- fuzzing: byte flips in a valid payload ----------------------------------------------------
def flipped(data: bytes, rng: np.random.Generator, start: int = 0) -> bytearray:
    """1–3 random bytes of data[start:] XORed with random non-zero bytes."""
    out = bytearray(data)
    for position in rng.integers(start, len(out), size=rng.integers(1, 4)):
        out[position] ^= int(rng.integers(1, 256))
    return out


@pytest.mark.parametrize("name", list(ALL))
def test_random_byte_flips_raise_only_malformed_message(name):
    rng = np.random.default_rng(list(ALL).index(name))
    message = encoded(name)
    codec = CODECS.build(ALL[name])
    key = name if name in PACKED else "a"  # the casts: flip the fp16/bf16 data and the meta
    data = message.tensors[key].view(torch.uint8).numpy().tobytes()
    outcomes = {"refused": 0, "decoded": 0}
    start = time.perf_counter()
    # the packed codecs: half the flips anywhere (mostly the compressed header, which zlib's
    # checksum catches), half in the entries' bytes after it
    body = 4 + struct.unpack("<I", data[:4])[0] if name in PACKED else 0
    for trial in range(200):
        damaged = torch.frombuffer(flipped(data, rng, body if trial % 2 else 0), dtype=torch.uint8)
        tensors_ = {**message.tensors, key: damaged if name in PACKED else damaged.view(message.tensors[key].dtype)}
        meta = dict(message.meta)
        if name not in PACKED and rng.random() < 0.5:
            meta[name] = _fuzzed_meta(meta[name], rng)
        try:
            decoded = codec.decode(Message(tensors_, meta), CTX)
        except MalformedMessage:
            outcomes["refused"] += 1
            continue
        outcomes["decoded"] += 1
        assert sum(t.numel() for t in decoded.tensors.values()) <= framing.MAX_ELEMENTS
    assert time.perf_counter() - start < 20
    assert outcomes["refused"] + outcomes["decoded"] == 200


def _fuzzed_meta(original: dict, rng: np.random.Generator):
    """A random mutation of a cast's {name: dtype} meta."""
    choices = [None, [], "float32", {"*": "int8"}, {"*": 1}, {**original, "a": "float64"}, {"zz": "float32"}, {1: "x"}]
    return choices[int(rng.integers(len(choices)))]


@pytest.mark.parametrize("name", list(PACKED))
def test_random_header_fields_raise_only_malformed_message(name):
    """The zlib checksum stops most flips in the header, so the header is also fuzzed as
    JSON: random fields of random entries set to hostile values, recompressed."""
    rng = np.random.default_rng(100 + list(PACKED).index(name))
    message = encoded(name)
    header, body = header_and_body(message, name)
    hostile = [-1, 0, 1, 2, 3, 64, 65, 2**31, 2**40, 10**30, -(2**63), 1.5, float("nan"), "x", "float32", None, [], [1] * 70, {}, True]
    codec = CODECS.build(ALL[name])
    for _ in range(200):
        crafted = json.loads(json.dumps(header))
        for _ in range(int(rng.integers(1, 3))):
            entry = crafted[int(rng.integers(len(crafted)))]
            key = list(entry)[int(rng.integers(len(entry)))]
            entry[key] = hostile[int(rng.integers(len(hostile)))]
        try:
            decoded = codec.decode(framed(message, name, crafted, body), LimitedContext(0, 0, 0, max_elements=10**6))
        except MalformedMessage:
            continue
        assert sum(t.numel() for t in decoded.tensors.values()) <= 10**6

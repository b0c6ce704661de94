"""Decoding untrusted bytes is bounded: a crafted header (huge shape, counts out of range, a
bad dtype, a bit width out of range, a truncated payload, a zlib bomb) raises
MalformedMessage before anything large is allocated, fast and in little memory; the caller's
`ctx.max_elements` bounds what a message may decode to; and random byte flips in a valid
payload never raise anything else. Run over the rows of the codec contract (test_contract.py)."""
import json
import struct
import time
import zlib

import numpy as np
import pytest
import torch

import fedllm.codecs.framing as framing
from fedllm.codecs.bitstream import pack_uints
from fedllm.codecs.cast import Cast
from fedllm.registry import CODECS
from fedllm.wire import MalformedMessage, Message, WireContext, deserialize, serialize
from tests.codecs.test_contract import CTX, ROWS, encoded, refused

PACKED = [row for row in ROWS if row.packed]
CASTS = [row for row in ROWS if issubclass(CODECS.get(row.options["name"]), Cast)]
OPTIONS = {row.id: row.options for row in ROWS}
packed = pytest.mark.parametrize("row", PACKED, ids=[r.id for r in PACKED])


def header_and_body(message: Message, key: str) -> tuple[list, bytes]:
    data = message.tensors[key].numpy().tobytes()
    (size,) = struct.unpack("<I", data[:4])
    return json.loads(zlib.decompress(data[4 : 4 + size])), data[4 + size :]


def framed(message: Message, key: str, header, body: bytes, raw_header: bytes | None = None) -> Message:
    """`message` with its payload replaced by `header` (a JSON value) and `body`."""
    compressed = raw_header if raw_header is not None else zlib.compress(json.dumps(header).encode())
    payload = bytearray(struct.pack("<I", len(compressed)) + compressed + body)
    return Message({**message.tensors, key: torch.frombuffer(payload, dtype=torch.uint8)}, dict(message.meta))


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


@packed
def test_framing_refuses_crafted_headers(row, zlib_bomb):
    options, name = row.options, row.options["name"]
    message = encoded(options)
    header, body = header_and_body(message, name)
    first = header[0]

    def with_first(**fields):
        return framed(message, name, [{**first, **fields}] + header[1:], body)

    refused(options, with_first(shape=[10**12]), r"more than 2147483648 elements")
    refused(options, with_first(shape=[2**20, 2**20, 2**20]), r"more than 2147483648 elements")
    refused(options, with_first(shape=[10**6]), r"more than 1000 elements", WireContext(0, 0, 0, max_elements=1000))
    refused(options, with_first(shape=[-1]), r"not an integer ≥ 0")
    refused(options, with_first(shape=[3.0, 100]), r"not an integer ≥ 0")
    refused(options, with_first(shape=[1] * 100), r"at most 32 sizes")
    refused(options, with_first(dtype="int64"), r"dtype 'int64' is not one of")
    refused(options, with_first(dtype="object"), r"dtype 'object' is not one of")
    refused(options, with_first(bytes=-5), r"'bytes' is -5")
    refused(options, with_first(bytes=10**15), r"overrun")
    refused(options, with_first(name="seeds"), r"name given twice")
    refused(options, with_first(name=None), r"name is None")
    refused(options, framed(message, name, header + [first], body), r"name given twice")
    refused(options, framed(message, name, header, body[:-1]), r"its entries describe|overrun")  # truncated payload
    refused(options, framed(message, name, header, body + b"\0"), r"payload has .* bytes, its entries describe")
    refused(options, framed(message, name, [0] * 70_000, body), r"at most 65536 entries")
    refused(options, framed(message, name, {"a": 1}, body), r"not a list")
    refused(options, framed(message, name, None, body, raw_header=b"not zlib"), r"does not inflate")
    refused(options, framed(message, name, None, body, raw_header=zlib.compress(b"[1,")), r"not JSON")
    refused(options, framed(message, name, None, body, raw_header=zlib.compress(b"[" * 100_000)), r"not JSON")
    refused(options, framed(message, name, None, body, raw_header=zlib.compress(b"[]")[:-3]), r"truncated")
    refused(options, framed(message, name, None, body, raw_header=zlib_bomb), r"inflates past 16777216 bytes", peak_mb=64)
    data = message.tensors[name].numpy().tobytes()
    refused(options, Message({**message.tensors, name: torch.tensor(list(data[:3]), dtype=torch.uint8)}), r"too short")
    refused(options, Message({**message.tensors, name: torch.frombuffer(bytearray(struct.pack("<I", 2**31) + data[4:]), dtype=torch.uint8)}),
            r"overruns")
    refused(options, Message({**message.tensors, name: torch.zeros(10)}), r"expected 1-D uint8")
    refused(options, Message({k: t for k, t in message.tensors.items() if k != name}), r"no '.*' payload")


# ---- each codec's own fields ---------------------------------------------------------------------
def single(name: str, x: torch.Tensor) -> tuple[Message, dict, bytes]:
    message = encoded(OPTIONS[name], Message({"w": x}))
    (info,), body = header_and_body(message, name)
    return message, info, body


def test_topk_refuses_counts_and_indices_out_of_range():
    message, info, body = single("topk", torch.arange(1.0, 6.0))  # 5 entries: one kept, 3-bit index
    assert info["count"] == 1

    def crafted(data=body, **fields):
        return framed(message, "topk", [{**info, "bytes": len(data), **fields}], data)

    refused(OPTIONS["topk"], crafted(count=10**12), r"'count' is 1000000000000, expected an integer in \[0, 5\]")
    refused(OPTIONS["topk"], crafted(count=-1), r"'count' is -1")
    refused(OPTIONS["topk"], crafted(count="1"), r"'count' is '1'")
    refused(OPTIONS["topk"], crafted(count=5), r"5 entries of 3-bit index \+ fp32 value take 22")
    refused(OPTIONS["topk"], crafted(body[:-1]), r"bytes, 1 entries")
    refused(OPTIONS["topk"], crafted(pack_uints(np.array([7]), 3) + body[1:]), r"indices are not increasing and below 5")
    two = pack_uints(np.array([3, 1]), 3) + body[1:] + body[1:]
    refused(OPTIONS["topk"], crafted(two, count=2), r"indices are not increasing")


def test_qsgd_refuses_lengths_and_levels_out_of_range():
    message, info, body = single("qsgd", torch.randn(20, generator=torch.Generator().manual_seed(1)))  # 2 buckets of 16
    assert len(body) == 2 * 4 + 32 * 3 // 8
    refused(OPTIONS["qsgd"], framed(message, "qsgd", [{**info, "shape": [40]}], body), r"3 buckets of 16 take 30")
    refused(OPTIONS["qsgd"], framed(message, "qsgd", [info], body[:-1] + b"\x7f"), r"a level is outside \[-2, 2\]")


def test_rqm_refuses_lengths_and_levels_out_of_range():
    message, info, body = single("rqm", torch.zeros(8))  # 5 levels: 3 bits each
    assert len(body) == 3
    refused(OPTIONS["rqm"], framed(message, "rqm", [{**info, "shape": [9]}], body), r"9 levels of 3 bits take 4")
    refused(OPTIONS["rqm"], framed(message, "rqm", [info], b"\xff" * 3), r"a level index is not below 5")


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
    refused(OPTIONS["fedzip"], crafted(enc="lz4"), r"encoding 'lz4' is not one of")
    refused(OPTIONS["fedzip"], crafted(lengths=[1, 2]), r"not 3 integers in \[0, 64\]")
    refused(OPTIONS["fedzip"], crafted(lengths=[1, 2, 65]), r"not 3 integers in \[0, 64\]")  # bit width out of range
    refused(OPTIONS["fedzip"], crafted(lengths=[1, 2, -1]), r"not 3 integers")
    refused(OPTIONS["fedzip"], crafted(lengths=[1] * 10**5), r"not 3 integers")
    refused(OPTIONS["fedzip"], crafted(lengths=[2, 2, 2]), r"not a complete prefix code")
    refused(OPTIONS["fedzip"], crafted(lengths=[1, 1, 1]), r"not a complete prefix code")
    refused(OPTIONS["fedzip"], crafted(lengths=[1, 64, 64]), r"not a complete prefix code")
    refused(OPTIONS["fedzip"], crafted(shape=[10**6]), r"cannot hold 1000000 Huffman codes")
    refused(OPTIONS["fedzip"], crafted(body + b"\0"), r"bytes after its 200 symbols")
    refused(OPTIONS["fedzip"], crafted(body[:-1]), r"symbols, expected 200")
    refused(OPTIONS["fedzip"], crafted(body[:5]), r"too short for 3 fp32 centroids")


@pytest.mark.parametrize("encoding", ["position", "gap"])
def test_fedzip_refuses_bad_sparse_encodings(encoding):
    message, info, body = fedzip_entry(encoding)
    count = info["count"]

    def crafted(data=body, **fields):
        return framed(message, "fedzip", [{**info, "bytes": len(data), **fields}], data)

    refused(OPTIONS["fedzip"], crafted(count=10**12), r"'count' is 1000000000000, expected an integer in \[0, 200\]")
    refused(OPTIONS["fedzip"], crafted(count=-3), r"'count' is -3")
    refused(OPTIONS["fedzip"], crafted(majority=3), r"'majority' is 3, expected an integer in \[0, 2\]")
    refused(OPTIONS["fedzip"], crafted(body + b"\0"), r"bytes, (position|gap) encoding of")
    refused(OPTIONS["fedzip"], crafted(body[:-1]), r"bytes, (position|gap) encoding of")
    # a huge dense tensor that the sparse encodings would make cheap to ask for
    refused(OPTIONS["fedzip"], crafted(shape=[2**40]), r"more than 2147483648 elements")
    refused(OPTIONS["fedzip"], crafted(shape=[10**7]), r"more than 10000 elements", WireContext(0, 0, 0, max_elements=10_000))
    if encoding == "gap":
        refused(OPTIONS["fedzip"], crafted(rice=63), r"'rice' is 63, expected an integer in \[0, 62\]")  # bit width out of range
        refused(OPTIONS["fedzip"], crafted(rice=-1), r"'rice' is -1")
        refused(OPTIONS["fedzip"], crafted(gap_bytes=len(body)), r"'gap_bytes' is")
        # one gap of 10^6 in a 10-entry tensor: in range of the stream, not of the tensor
        runs = b"\xff" * 125 + b"\x00"  # 1000 ones then zeros: unary quotient 1000 with rice 0
        framed_gap = framed(message, "fedzip", [{**info, "shape": [10], "count": 1, "rice": 0, "gap_bytes": len(runs), "bytes": 12 + len(runs) + 1}],
                            body[:12] + runs + b"\0")
        refused(OPTIONS["fedzip"], framed_gap, r"exceeds 10")
    else:
        width = 8  # ⌈log2 200⌉
        refused(OPTIONS["fedzip"], crafted(body[:12] + pack_uints(np.full(count, 255), width) + body[12 + count:]),
                r"positions are not increasing indices below 200")
        # 4 clusters: the 3 minority ids take 2 bits, and 3 is not one of them
        message, info, body = fedzip_entry(encoding, clusters=4)
        count = info["count"]
        refused({"name": "fedzip", "clusters": 4}, framed(message, "fedzip", [info], body[:16 + count] + b"\xff" * (len(body) - 16 - count)),
                r"a minority id is not below 3")


@pytest.mark.parametrize("row", CASTS, ids=[r.id for r in CASTS])
def test_casts_refuse_bad_meta_and_unexpected_tensors(row):
    options, name = row.options, row.options["name"]
    message = encoded(options)
    meta = message.meta[name]

    def crafted(meta_value=..., **tensors_):
        m = {**message.meta}
        if meta_value is ...:
            m.pop(name)
        else:
            m[name] = meta_value
        return Message({**message.tensors, **tensors_}, m)

    refused(options, crafted(), r"meta '.*' is None")
    refused(options, crafted({"*": "int64"}), r"not a map of names to")
    refused(options, crafted({"*": "float32", "x": 3}), r"not a map of names to")
    refused(options, crafted(["float32"]), r"not a map of names to")
    refused(options, crafted(meta, c=torch.zeros(4)), r"tensor 'c': is float32, expected")
    refused(options, crafted({"a": "float32"}), r"tensor 'b': has no original dtype")


# ---- fuzzing: byte flips in a valid payload ----------------------------------------------------
def flipped(data: bytes, rng: np.random.Generator, start: int = 0) -> bytearray:
    """1–3 random bytes of data[start:] XORed with random non-zero bytes."""
    out = bytearray(data)
    for position in rng.integers(start, len(out), size=rng.integers(1, 4)):
        out[position] ^= int(rng.integers(1, 256))
    return out


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_random_byte_flips_raise_only_malformed_message(row):
    name = row.options["name"]
    rng = np.random.default_rng(ROWS.index(row))
    message = encoded(row.options)
    codec = CODECS.build(row.options)
    key = name if row.packed else "a"  # the others: flip the float data (and a cast's meta)
    data = message.tensors[key].view(torch.uint8).numpy().tobytes()
    outcomes = {"refused": 0, "decoded": 0}
    start = time.perf_counter()
    # the packed codecs: half the flips anywhere (mostly the compressed header, which zlib's
    # checksum catches), half in the entries' bytes after it
    body = 4 + struct.unpack("<I", data[:4])[0] if row.packed else 0
    for trial in range(200):
        damaged = torch.frombuffer(flipped(data, rng, body if trial % 2 else 0), dtype=torch.uint8)
        tensors_ = {**message.tensors, key: damaged if row.packed else damaged.view(message.tensors[key].dtype)}
        meta = dict(message.meta)
        if name in meta and rng.random() < 0.5:
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


@packed
def test_random_header_fields_raise_only_malformed_message(row):
    """The zlib checksum stops most flips in the header, so the header is also fuzzed as
    JSON: random fields of random entries set to hostile values, recompressed."""
    name = row.options["name"]
    rng = np.random.default_rng(100 + PACKED.index(row))
    message = encoded(row.options)
    header, body = header_and_body(message, name)
    hostile = [-1, 0, 1, 2, 3, 64, 65, 2**31, 2**40, 10**30, -(2**63), 1.5, float("nan"), "x", "float32", None, [], [1] * 70, {}, True]
    codec = CODECS.build(row.options)
    for _ in range(200):
        crafted = json.loads(json.dumps(header))
        for _ in range(int(rng.integers(1, 3))):
            entry = crafted[int(rng.integers(len(crafted)))]
            key = list(entry)[int(rng.integers(len(entry)))]
            entry[key] = hostile[int(rng.integers(len(hostile)))]
        try:
            decoded = codec.decode(framed(message, name, crafted, body), WireContext(0, 0, 0, max_elements=10**6))
        except MalformedMessage:
            continue
        assert sum(t.numel() for t in decoded.tensors.values()) <= 10**6

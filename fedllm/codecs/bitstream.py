"""Bit-level coding shared by the codecs: fixed-width integers, canonical Huffman codes and
Rice codes (Golomb codes with a power-of-two divisor, the near-optimal code for the
geometric run lengths of a sparse mask). numpy arrays in, `bytes` out, and every coder has
an exact inverse. Bits are written most significant first; each stream is padded to a
whole byte, so its length in bytes is ⌈bits / 8⌉."""
from __future__ import annotations

import heapq

import numpy as np

CHUNK = 1 << 16  # values per vectorised step: bounds the temporary bit arrays


def bit_width(n: int) -> int:
    """Bits needed to tell n values apart: ⌈log2 n⌉ (0 for n ≤ 1)."""
    return max(0, int(n - 1).bit_length())


# ---- fixed width --------------------------------------------------------------------------
def pack_uints(values: np.ndarray, width: int) -> bytes:
    """Each value (0 ≤ v < 2^width ≤ 2^64) in exactly `width` bits."""
    values = np.asarray(values, dtype=np.uint64)
    if width == 0 or values.size == 0:
        return b""
    if width < 64 and int(values.max()) >> width:
        raise ValueError(f"a value does not fit in {width} bits")
    chunks = []
    for i in range(0, values.size, CHUNK):
        # the 64 big-endian bits of each value, keeping the low `width`
        bits = np.unpackbits(values[i : i + CHUNK].astype(">u8").view(np.uint8).reshape(-1, 8), axis=1)
        chunks.append(bits[:, 64 - width :].ravel())
    return np.packbits(np.concatenate(chunks)).tobytes()


def unpack_uints(data: bytes, width: int, count: int) -> np.ndarray:
    """`count` values of `width` bits (0 ≤ width ≤ 63) from the start of `data`, as int64."""
    if not 0 <= width <= 63 or count < 0:
        raise ValueError(f"cannot unpack {count} values of {width} bits")
    if width == 0 or count == 0:
        return np.zeros(count, dtype=np.int64)
    if len(data) * 8 < count * width:
        raise ValueError(f"bitstream too short: {len(data) * 8} bits for {count} values of {width} bits")
    out = np.empty(count, dtype=np.int64)
    step = CHUNK - CHUNK % 8  # whole bytes per chunk: CHUNK·width bits
    for i in range(0, count, step):
        n = min(step, count - i)
        start = i * width // 8  # i·width is a whole number of bytes
        bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8, count=-(-n * width // 8), offset=start), count=n * width)
        padded = np.zeros((n, 64), dtype=np.uint8)
        padded[:, 64 - width :] = bits.reshape(n, width)
        out[i : i + n] = np.packbits(padded, axis=1).view(">u8").ravel()
    return out


# ---- canonical Huffman --------------------------------------------------------------------
def huffman_lengths(counts: np.ndarray) -> np.ndarray:
    """Code length of each symbol (0 for symbols that never occur). A lone symbol gets 1 bit.
    Ties break on the symbol index, so every party derives the same code from the counts."""
    used = [(int(c), i) for i, c in enumerate(counts) if c > 0]
    lengths = np.zeros(len(counts), dtype=np.int64)
    if len(used) == 1:
        lengths[used[0][1]] = 1
    # heap of (count, tie-break, symbols under this node)
    heap = [(c, i, [i]) for c, i in used]
    heapq.heapify(heap)
    while len(heap) > 1:
        c1, t1, s1 = heapq.heappop(heap)
        c2, t2, s2 = heapq.heappop(heap)
        lengths[s1 + s2] += 1  # every symbol under the merged node gets one bit deeper
        heapq.heappush(heap, (c1 + c2, min(t1, t2), s1 + s2))
    return lengths


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical Huffman codes: symbols sorted by (length, index) take consecutive codes, so
    the code lengths alone describe the code (they are all a header needs to carry)."""
    codes = np.zeros(len(lengths), dtype=np.uint64)
    code, previous = 0, 0
    for symbol in sorted((i for i in range(len(lengths)) if lengths[i] > 0), key=lambda i: (lengths[i], i)):
        code <<= int(lengths[symbol]) - previous
        codes[symbol], previous = code, int(lengths[symbol])
        code += 1
    return codes


def huffman_encode(symbols: np.ndarray, lengths: np.ndarray) -> bytes:
    symbols = np.asarray(symbols, dtype=np.int64)
    if symbols.size == 0:
        return b""
    codes, lengths = canonical_codes(lengths), np.asarray(lengths, dtype=np.int64)
    if (lengths[symbols] == 0).any():
        raise ValueError("a symbol without a Huffman code")
    chunks = []
    for i in range(0, symbols.size, CHUNK):
        s = symbols[i : i + CHUNK]
        n = lengths[s]
        owner = np.repeat(np.arange(s.size), n)  # which symbol each output bit belongs to
        within = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
        shift = (n[owner] - 1 - within).astype(np.uint64)
        chunks.append(((codes[s][owner] >> shift) & np.uint64(1)).astype(np.uint8))
    return np.packbits(np.concatenate(chunks)).tobytes()


def _byte_tables(lengths: np.ndarray) -> tuple[list[list[tuple]], list[list[int]]]:
    """For each internal node of the code tree and each byte value: the symbols the byte
    completes from that node and the node it ends in. Decoding is then one table lookup
    per byte instead of one branch per bit."""
    codes = canonical_codes(lengths)
    children = [[None, None]]  # node -> [child for bit 0, bit 1]; int ≥ 0 node, ('leaf', s)
    for symbol in np.flatnonzero(lengths):
        node = 0
        for j in range(int(lengths[symbol]) - 1, -1, -1):
            bit = int(codes[symbol] >> np.uint64(j)) & 1
            if j == 0:
                children[node][bit] = ("leaf", int(symbol))
            else:
                if children[node][bit] is None:
                    children.append([None, None])
                    children[node][bit] = len(children) - 1
                node = children[node][bit]
    emit = [[()] * 256 for _ in children]
    end = [[0] * 256 for _ in children]
    for start in range(len(children)):
        for byte in range(256):
            node, out = start, []
            for j in range(7, -1, -1):
                child = children[node][(byte >> j) & 1]
                if child is None:  # only reachable through padding after the last symbol
                    node = 0
                    break
                if isinstance(child, tuple):
                    out.append(child[1])
                    node = 0
                else:
                    node = child
            emit[start][byte], end[start][byte] = tuple(out), node
    return emit, end


def huffman_decode(data: bytes, lengths: np.ndarray, count: int) -> np.ndarray:
    """`count` symbols; `data` must end in the byte holding the last one."""
    if count == 0:
        if data:
            raise ValueError(f"Huffman stream of {len(data)} bytes for no symbols")
        return np.zeros(0, dtype=np.int64)
    emit, end = _byte_tables(np.asarray(lengths, dtype=np.int64))
    out, node = [], 0
    for used, byte in enumerate(data, 1):
        out.extend(emit[node][byte])
        node = end[node][byte]
        if len(out) >= count:
            if used < len(data):
                raise ValueError(f"Huffman stream has {len(data) - used} bytes after its {count} symbols")
            break
    if len(out) < count:
        raise ValueError(f"Huffman stream holds {len(out)} symbols, expected {count}")
    return np.asarray(out[:count], dtype=np.int64)


# ---- Rice codes -----------------------------------------------------------------------------
def rice_cost(values: np.ndarray, k: int) -> int:
    """Bits of the Rice code of `values` with parameter k: quotient in unary, k-bit remainder."""
    return int((np.asarray(values, dtype=np.int64) >> k).sum()) + len(values) * (k + 1)


def rice_parameter(values: np.ndarray) -> int:
    """The k (0..40) with the shortest code; the cost is convex in k, so scan until it rises."""
    best = 0
    for k in range(1, 41):
        if rice_cost(values, k) >= rice_cost(values, best):
            break
        best = k
    return best


def rice_encode(values: np.ndarray, k: int) -> bytes:
    """Non-negative integers as one stream: all unary quotients (q ones then a zero), then
    all k-bit remainders. Same length as interleaving them, and both halves decode with
    vector operations."""
    values = np.asarray(values, dtype=np.int64)
    if values.size == 0:
        return b""
    quotients = values >> k
    unary = np.ones(int(quotients.sum()) + values.size, dtype=np.uint8)
    unary[np.cumsum(quotients + 1) - 1] = 0  # the terminating zero of each quotient
    remainders = values & ((1 << k) - 1)
    shifts = np.arange(k - 1, -1, -1, dtype=np.int64)
    tail = ((remainders[:, None] >> shifts) & 1).astype(np.uint8).ravel()
    return np.packbits(np.concatenate([unary, tail])).tobytes()


def rice_decode(data: bytes, k: int, count: int, max_value: int | None = None) -> np.ndarray:
    """`count` values; `data` must be exactly as long as their code, and with `max_value`
    every value must be ≤ it (checked before the shift that could overflow)."""
    if not 0 <= k <= 62 or count < 0:
        raise ValueError(f"cannot decode {count} Rice values with parameter {k}")
    if count == 0:
        if data:
            raise ValueError(f"Rice stream of {len(data)} bytes for no values")
        return np.zeros(0, dtype=np.int64)
    if len(data) * 8 < count * (k + 1):
        raise ValueError(f"Rice stream of {len(data)} bytes is too short for {count} values")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    zeros = np.flatnonzero(bits == 0)[:count]
    if zeros.size < count:
        raise ValueError(f"Rice stream holds {zeros.size} values, expected {count}")
    quotients = np.diff(zeros, prepend=-1) - 1
    start = int(zeros[-1]) + 1
    if -(-(start + count * k) // 8) != len(data):
        raise ValueError(f"Rice stream of {len(data)} bytes, its {count} values take {-(-(start + count * k) // 8)}")
    if max_value is not None and int(quotients.max()) > max_value >> k:
        raise ValueError(f"a Rice value exceeds {max_value}")
    tail = bits[start : start + count * k]
    remainders = tail.reshape(count, k).astype(np.int64) @ (1 << np.arange(k - 1, -1, -1, dtype=np.int64)) if k else 0
    values = (quotients << k) + remainders
    if max_value is not None and int(values.max()) > max_value:
        raise ValueError(f"a Rice value exceeds {max_value}")
    return values

"""The bit-level coders: every one is exactly invertible, and Huffman and Rice codes are as
short as their theory says."""
import numpy as np
import pytest

from fedllm.codecs.bitstream import (
    bit_width, canonical_codes, huffman_decode, huffman_encode, huffman_lengths, pack_uints, rice_cost,
    rice_decode, rice_encode, rice_parameter, unpack_uints,
)

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("width", [1, 3, 17, 33])
def test_fixed_width_integers_round_trip_in_exactly_width_bits(width):
    values = RNG.integers(0, 2**width, size=1001)
    data = pack_uints(values, width)
    assert len(data) == -(-1001 * width // 8)
    assert np.array_equal(unpack_uints(data, width, 1001), values)


def test_bit_width_is_the_ceiling_of_log2():
    assert [bit_width(n) for n in (1, 2, 3, 4, 5, 16, 17, 100_000)] == [0, 1, 2, 2, 3, 4, 5, 17]


def test_a_value_too_wide_is_refused():
    with pytest.raises(ValueError, match="does not fit in 3 bits"):
        pack_uints(np.array([8]), 3)


def test_huffman_code_is_complete_prefix_free_and_round_trips():
    counts = np.array([500, 120, 120, 40, 0, 7, 1])
    lengths = huffman_lengths(counts)
    assert lengths[4] == 0 and sum(2.0 ** -l for l in lengths if l) == 1.0  # Kraft equality: a full tree
    codes = canonical_codes(lengths)
    words = [format(int(codes[s]), f"0{lengths[s]}b") for s in np.flatnonzero(lengths)]
    assert not any(a != b and b.startswith(a) for a in words for b in words)  # prefix-free
    symbols = np.repeat(np.arange(7), counts)
    RNG.shuffle(symbols)
    data = huffman_encode(symbols, lengths)
    assert len(data) == -(-int((lengths[symbols]).sum()) // 8)
    assert np.array_equal(huffman_decode(data, lengths, symbols.size), symbols)


def test_huffman_of_three_symbols_at_80_10_10_costs_one_point_two_bits():
    lengths = huffman_lengths(np.array([100, 800, 100]))
    assert lengths.tolist() == [2, 1, 2]


def test_a_lone_symbol_gets_one_bit():
    lengths = huffman_lengths(np.array([0, 9, 0]))
    assert lengths.tolist() == [0, 1, 0]
    assert np.array_equal(huffman_decode(huffman_encode(np.ones(9, int), lengths), lengths, 9), np.ones(9))


@pytest.mark.parametrize("k", [0, 2, 7])
def test_rice_codes_round_trip(k):
    values = RNG.geometric(0.05, size=777) - 1
    data = rice_encode(values, k)
    assert len(data) == -(-rice_cost(values, k) // 8)
    assert np.array_equal(rice_decode(data, k, values.size), values)


def test_the_rice_parameter_is_the_cheapest():
    values = RNG.geometric(0.01, size=1000) - 1
    costs = [rice_cost(values, k) for k in range(20)]
    assert rice_parameter(values) == int(np.argmin(costs))

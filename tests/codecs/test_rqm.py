"""RQM: unbiased for every kept-level pattern, ⌈log2 m⌉ bits per coordinate on the wire, and
a privacy report that is exactly the scalar mechanism's Rényi divergence."""
import itertools
import math

import numpy as np
import pytest
import torch

from fedllm.codecs.rqm import RQM, bracket, level_values, output_pmf, renyi_per_coordinate
from fedllm.privacy.accountant import ORDERS
from fedllm.registry import CODECS
from fedllm.wire import Message, WireContext, deserialize, serialize
from tests.codecs.test_contract import round_trip, update

C, EXT, Q = 1.0, 0.5, 0.4


@pytest.mark.parametrize("m", [3, 5, 6])
def test_every_kept_pattern_rounds_without_bias_and_the_pmf_is_exact(m):
    values = level_values(C, EXT, m)
    for x in np.linspace(-C, C, 9):
        pmf = np.zeros(m)
        for pattern in itertools.product([False, True], repeat=m - 2):
            kept = np.array([[True, *pattern, True]])
            (lo,), (hi,), (up,) = bracket(np.array([x]), kept, values)
            assert kept[0, lo] and kept[0, hi] and values[lo] <= x <= values[hi]
            assert not kept[0, lo + 1 : hi].any()  # the nearest kept neighbours
            assert values[lo] * (1 - up) + values[hi] * up == pytest.approx(x, abs=1e-12)  # E[decode | pattern] = x
            weight = math.prod(Q if keep else 1 - Q for keep in pattern)
            pmf[lo] += weight * (1 - up)
            pmf[hi] += weight * up
        np.testing.assert_allclose(output_pmf(x, C, EXT, m, Q), pmf, atol=1e-12)


def test_the_codec_is_unbiased_and_clips_to_c():
    codec = RQM(clip=C, extension=EXT, levels=5, keep_prob=Q)
    x = torch.linspace(-1.5, 1.5, 13)
    draws = torch.stack([
        codec.decode(deserialize(serialize(codec.encode(Message({"w": x}), WireContext(r, 0, 0)))), None).tensors["w"]
        for r in range(1500)
    ])
    assert set(draws.unique().tolist()) <= set(torch.from_numpy(level_values(C, EXT, 5)).float().tolist())
    assert (draws.mean(0) - x.clamp(-C, C)).abs().max() < 4 * (C + EXT) / 1500**0.5


def test_options_build_through_the_registry_and_only_float_coordinates_count():
    assert CODECS.build({"name": "rqm", "clip": 0.1, "levels": 4}).width == 2
    floats, ints = update()
    codec = CODECS.build({"name": "rqm", "clip": 0.5})
    round_trip(codec, Message({**floats, **ints}), {})
    assert codec.dimension == sum(t.numel() for t in floats.values())


@pytest.mark.parametrize("m", [2, 5, 16])
def test_the_wire_carries_ceil_log2_m_bits_per_coordinate(m):
    d = 40_000
    codec = RQM(clip=C, extension=EXT, levels=m, keep_prob=Q)
    wire = len(serialize(codec.encode(Message({"w": torch.randn(d)}), WireContext(0, 0, 0))))
    payload = d * math.ceil(math.log2(m)) / 8
    assert payload <= wire < payload + 200


def test_privacy_is_the_exact_renyi_divergence_per_coordinate_and_adds_over_coordinates():
    curve = renyi_per_coordinate(C, EXT, 4, 0.5)
    p, r = output_pmf(C, C, EXT, 4, 0.5), output_pmf(-C, C, EXT, 4, 0.5)
    alpha = ORDERS.index(2.0)
    assert curve[alpha] == pytest.approx(np.log((p**2 / r).sum()), rel=1e-9)  # the worst pair is (c, −c)
    assert curve[-1] == pytest.approx(np.log(p / r).max(), rel=0.01)  # α → ∞: the pure-DP ε
    assert np.isinf(renyi_per_coordinate(C, EXT, 4, 1.0)).all()  # every level kept: rounding alone leaks
    assert np.isinf(renyi_per_coordinate(C, 0.0, 4, 0.5)).all()  # no range extension: ±c are endpoints
    codec = RQM(clip=C, extension=EXT, levels=4, keep_prob=0.5)
    codec.encode(Message({"w": torch.zeros(100)}), WireContext(0, 0, 0))
    one, ten = codec.accounting(1), codec.accounting(10)
    assert one["rqm_epsilon_coordinate"] < ten["rqm_epsilon_coordinate"] < one["rqm_epsilon"] < ten["rqm_epsilon"]

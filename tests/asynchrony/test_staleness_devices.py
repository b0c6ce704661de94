"""Staleness functions as the papers define them, and the seeded device model."""
import math

import numpy as np
import pytest

from fedllm.devices import Devices, client_speeds
from fedllm.recipe import ClientConfig, DeviceConfig
from fedllm.registry import STALENESS, RecipeError


def test_staleness_weights_follow_fedasync_and_fedbuff():
    constant = STALENESS.build({"name": "constant"})
    poly = STALENESS.build({"name": "polynomial", "a": 0.5})
    hinge = STALENESS.build({"name": "hinge", "a": 10.0, "b": 4})
    assert [constant.weight(t) for t in (0, 3, 100)] == [1.0, 1.0, 1.0]
    # (τ + 1)^−a; a = 0.5 is FedBuff's 1/√(1 + τ)
    assert [poly.weight(t) for t in (0, 1, 3, 8)] == pytest.approx([1.0, 1 / math.sqrt(2), 0.5, 1 / 3])
    # 1 up to b, then 1 / (a(τ − b) + 1)
    assert [hinge.weight(t) for t in (0, 4, 5, 6)] == pytest.approx([1.0, 1.0, 1 / 11, 1 / 21])
    with pytest.raises(RecipeError, match="must be >= 0"):
        STALENESS.build({"name": "polynomial", "a": -1.0})


def test_speeds_are_seeded_lognormal_with_slow_clients_last():
    cfg = DeviceConfig(profile="lognormal", sigma=1.0)
    a, b, other = client_speeds(cfg, 200, 0), client_speeds(cfg, 200, 0), client_speeds(cfg, 200, 1)
    assert (a == b).all() and not (a == other).all()
    assert abs(np.log(a).std() - 1.0) < 0.15 and abs(np.log(a).mean()) < 0.2
    slow = client_speeds(DeviceConfig(profile="lognormal", slow_fraction=0.25, slow_factor=10.0), 8, 0)
    assert np.allclose(slow[6:] * 10, client_speeds(cfg, 8, 0)[6:]) and np.allclose(slow[:6], client_speeds(cfg, 8, 0)[:6])


def test_a_round_lasts_its_tokens_over_its_speed(tmp_path):
    path = tmp_path / "speeds.csv"
    path.write_text("speed\n1.0\n2.0\n0.5\n")
    data = [[{"input_ids": [0] * 10}, {"input_ids": [0] * 30}], [{"input_ids": [0] * 20}], [{"input_ids": [0] * 40}]]
    client = ClientConfig(max_steps=3, per_device_train_batch_size=2)
    devices = Devices(DeviceConfig(profile="csv", path=str(path), tokens_per_second=100.0), client, data, 0)
    # 3 steps × 2 examples × mean length, at speed × 100 tokens/s
    assert [devices.duration(c) for c in range(3)] == pytest.approx([120 / 100, 120 / 200, 240 / 50])
    assert devices.tiers(3) == [1, 2, 0] and devices.tiers(2) == [0, 1, 0]
    equal = Devices(DeviceConfig(profile="equal"), client, data, 0)
    assert len({equal.duration(c) for c in range(3)}) == 1
    with pytest.raises(RecipeError, match="lists 3 client speeds"):
        Devices(DeviceConfig(profile="csv", path=str(path)), client, data * 2, 0)

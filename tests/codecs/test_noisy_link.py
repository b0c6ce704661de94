"""The simulated noisy link: received SNR is the configured one, erasures drop the given
share of uploads, integer tensors pass exactly, the downlink is corrupted only when asked,
and every draw replays from (seed, round, client)."""
import math

import pytest
import torch

from fedllm.adapters.base import Adapter
from fedllm.channel import Channel
from fedllm.codecs.noisy_link import NoisyLink
from fedllm.registry import CODECS
from fedllm.wire import MalformedMessage, WireContext


def update(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(300, 40, generator=g) * 0.01, "b": torch.randn(500, generator=g) * 3.0}


@pytest.mark.parametrize("snr_db", [0.0, 10.0, 30.0])
def test_received_uplink_has_the_configured_snr(snr_db):
    link = NoisyLink(snr_db=snr_db)
    channel = Channel(Adapter(), [link])
    signal = noise = 0.0
    for client in range(20):
        sent = update(client)
        received, _ = channel.up(sent, {}, WireContext(3, client, 7), {})
        for k in sent:
            signal += float(sent[k].double().square().sum())
            noise += float((received.delta[k].double() - sent[k].double()).square().sum())
    measured = 10 * math.log10(signal / noise)
    assert abs(measured - snr_db) < 0.1  # 20 × 12.5k Gaussian draws: the estimate is within ±0.05 dB
    assert abs(link.accounting(1)["channel_up_snr_db"] - snr_db) < 0.1  # what the metrics log says


def test_noise_std_mode_adds_exactly_that_variance():
    link = NoisyLink(snr_db=None, noise_std=0.5)
    received, _ = Channel(Adapter(), [link]).up(update(), {}, WireContext(0, 0, 0), {})
    residual = torch.cat([(received.delta[k] - update()[k]).flatten() for k in ("a", "b")])
    assert abs(float(residual.std()) - 0.5) < 0.01


def test_erasure_drops_that_share_of_uploads_and_integers_pass_exactly():
    channel = Channel(Adapter(), [NoisyLink(snr_db=20.0, erasure=0.3)])
    ints = torch.arange(10, dtype=torch.int64)
    erased = 0
    for client in range(1000):
        try:
            received, _ = channel.up({"a": torch.ones(4)}, {"n": ints}, WireContext(0, client, 1), {})
            assert torch.equal(received.extras["n"], ints)
        except MalformedMessage as err:
            assert "erased" in str(err) and err.bytes > 0  # the client's bytes were still sent
            erased += 1
    assert 0.26 < erased / 1000 < 0.34  # binomial(1000, 0.3): ±4σ


def test_downlink_noise_only_when_asked_and_replays_per_round_and_client():
    state = update()
    quiet = Channel(Adapter(), [NoisyLink(snr_db=10.0)]).down(state, {}, torch.device("cpu"), WireContext(0, -1, 0))
    assert all(torch.equal(quiet.x_t[k], state[k]) for k in state)
    loud = Channel(Adapter(), [NoisyLink(snr_db=10.0, downlink=True)])
    first = loud.down(state, {}, torch.device("cpu"), WireContext(2, 5, 0)).x_t
    again = loud.down(state, {}, torch.device("cpu"), WireContext(2, 5, 0)).x_t
    other = loud.down(state, {}, torch.device("cpu"), WireContext(2, 6, 0)).x_t
    assert all(torch.equal(first[k], again[k]) for k in state)
    assert not torch.equal(first["a"], other["a"])
    power = sum(float(t.square().sum()) for t in state.values())
    noise = sum(float((first[k] - state[k]).square().sum()) for k in state)
    assert abs(10 * math.log10(power / noise) - 10.0) < 0.3  # one 12.5k-entry draw


def test_recipe_options_are_checked():
    assert CODECS.build({"name": "noisy_link"}).snr_db == 20.0
    with pytest.raises(ValueError, match="exactly one"):
        CODECS.build({"name": "noisy_link", "noise_std": 0.1})
    with pytest.raises(ValueError, match="erasure"):
        CODECS.build({"name": "noisy_link", "erasure": 1.0})


@pytest.mark.slow
def test_an_engine_run_ledgers_erased_uploads_and_logs_the_measured_snr(recipe_file):
    from fedllm.engine import run_recipe
    from fedllm.metrics import read_jsonl

    path = recipe_file(codecs=[{"name": "noisy_link", "snr_db": 15.0, "downlink": True, "erasure": 0.5}],
                       federation={"rounds": 3, "num_clients": 4, "clients_per_round": 4})
    run_dir = run_recipe(str(path))
    ledger, metrics = read_jsonl(run_dir / "ledger.jsonl"), read_jsonl(run_dir / "metrics.jsonl")
    erased = [r for r in ledger if r.get("rejected") == "erased"]
    assert 0 < len(erased) < len(ledger) and all(r["bytes_up"] > 0 for r in erased)
    assert sum(len(m.get("rejected", {}).get("erased", [])) for m in metrics) == len(erased)
    assert metrics[-1]["channel_erased"] == len(erased)
    assert abs(metrics[-1]["channel_up_snr_db"] - 15.0) < 0.5 and abs(metrics[-1]["channel_down_snr_db"] - 15.0) < 0.5

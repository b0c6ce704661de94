"""The accountant: the reference ε, ledgers that survive a checkpoint, and calibration."""
import time

import pytest
import torch
from safetensors.torch import load, save

from fedllm.privacy.accountant import Event, Ledger, calibrate, epsilon_of


def test_one_gaussian_round_at_z_1_is_the_opacus_reference():
    ledger = Ledger().compose(Event(1.0))
    assert ledger.epsilon(1e-5) == pytest.approx(4.73, abs=0.005)  # q=1, z=1, 1 round, δ=1e-5 (RDP)
    assert ledger.epsilon(1e-5, "pld") < ledger.epsilon(1e-5)  # PLD is tighter, never looser


def test_gaussian_rounds_fold_into_one_exact_event():
    folded = Ledger().compose(Event(2.0), 3).compose(Event(1.0))
    assert len(folded.events) == 1
    assert next(iter(folded.events)).noise == pytest.approx((3 / 4 + 1) ** -0.5)
    assert folded.epsilon(1e-5, "pld") == pytest.approx(epsilon_of({Event((3 / 4 + 1) ** -0.5): 1}, 1e-5, "pld"))


def test_a_ledger_survives_safetensors_and_resumes_the_same_epsilon_sequence():
    event = Event(1.1, "poisson", rate=0.05)
    straight, spent = Ledger(), []
    for _ in range(6):
        spent.append(straight.compose(event, 10).epsilon(1e-5))
    resumed = Ledger().compose(event, 10).compose(event, 10)
    resumed = Ledger(load(save({"ledger": resumed.state()}))["ledger"])  # a checkpoint round trip
    continued = [resumed.epsilon(1e-5)] + [resumed.compose(event, 10).epsilon(1e-5) for _ in range(4)]
    assert continued == pytest.approx(spent[1:], rel=1e-12)
    assert all(a < b for a, b in zip(spent, spent[1:]))


def test_sampling_without_replacement_uses_replace_one_and_cannot_mix():
    event = Event(0.5, "without_replacement", population=100, sample=10)
    assert 0 < Ledger().compose(event, 50).epsilon(1e-5) < Ledger().compose(Event(0.5), 50).epsilon(1e-5)
    with pytest.raises(ValueError, match="cannot mix"):
        Ledger().compose(event).compose(Event(1.0)).epsilon(1e-5)
    with pytest.raises(ValueError, match="use accountant: rdp"):
        Ledger().compose(event).epsilon(1e-5, "pld")


def test_calibration_spends_the_target_and_no_more():
    def gaussian_rounds(z):
        return {Event(z): 50}

    noise = [calibrate(gaussian_rounds, target, 1e-5) for target in (6.0, 3.0, 1.0)]
    assert noise[0] < noise[1] < noise[2]  # less ε, more noise
    for z, target in zip(noise, (6.0, 3.0, 1.0)):
        assert epsilon_of(gaussian_rounds(z), 1e-5) <= target < epsilon_of(gaussian_rounds(z * 0.999), 1e-5)

    def sampled_steps(z):
        return {Event(z, "poisson", rate=0.08): 500}

    z = calibrate(sampled_steps, 3.0, 1e-5)
    assert epsilon_of(sampled_steps(z), 1e-5) <= 3.0 < epsilon_of(sampled_steps(z * 0.995), 1e-5)


def test_an_event_without_noise_is_refused():
    with pytest.raises(ValueError, match="positive noise"):
        Event(0.0)
    assert Ledger(torch.zeros(0, 6)).epsilon(1e-5) == 0.0


def test_pld_calibration_starts_from_rdp_and_is_quick():
    # from z = 0.01 the PLD search allocated tens of GiB; from RDP's answer it takes seconds
    def sampled_steps(z):
        return {Event(z, "poisson", rate=0.08): 200}

    z_rdp = calibrate(sampled_steps, 3.0, 1e-5, "rdp")
    start = time.perf_counter()
    z_pld = calibrate(sampled_steps, 3.0, 1e-5, "pld")
    assert time.perf_counter() - start < 30
    # RDP bounds the same ε more loosely, so PLD needs no more noise (here ~7% less)
    assert 0.85 * z_rdp < z_pld <= z_rdp
    assert epsilon_of(sampled_steps(z_pld), 1e-5, "pld") <= 3.0 < epsilon_of(sampled_steps(z_pld * 0.995), 1e-5, "pld")

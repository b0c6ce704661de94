"""All strategy state is in what the engine checkpoints (server state + client store): a
fresh strategy object continuing from those tensors, written to and read back from
safetensors files, ends exactly where an uninterrupted run ends."""
import pytest
import torch
from quadratic import Quadratic, Run, simulate
from safetensors.torch import load_file

from fedllm.attacks import SignFlip
from fedllm.registry import STRATEGIES
from fedllm.state import ClientStore, save_state

PROBLEM = Quadratic.reference()
SPECS = [
    ({"name": "scaffold"}, {}),
    ({"name": "fedspeed", "rho": 0.05, "lam": 0.5}, {}),
    ({"name": "fedavg_client_momentum", "beta": 0.3}, {}),
    ({"name": "scaffold_m", "beta": 0.3}, {}),
    ({"name": "fedamd", "anchor_prob": 0.3}, {"clients_per_round": 5}),
    ({"name": "centered_clip", "tau": 2.0, "f": 2, "nnm": True, "momentum": 0.5}, {"clients_per_round": 7}),
]


def through_disk(run: Run, tmp_path) -> Run:
    save_state(run.server_state, tmp_path / "server_state.safetensors")
    store = ClientStore(tmp_path / "spill", budget_bytes=0)
    for client_id, state in run.store.items():
        store.put(client_id, state)
    store.save(tmp_path / "clients")
    restored = ClientStore(tmp_path / "restored", budget_bytes=1 << 20)
    restored.restore(tmp_path / "clients")
    return Run(run.x.clone(), load_file(str(tmp_path / "server_state.safetensors")),
               {i: restored.get(i) for i in restored.ids()}, list(run.history))


@pytest.mark.parametrize("spec, setup", SPECS, ids=lambda s: s["name"] if "name" in s else "")
def test_a_fresh_strategy_resumes_from_the_checkpointed_tensors_exactly(spec, setup, tmp_path):
    kwargs = dict(lr=0.05, steps=5, **setup)
    attack = SignFlip(count=1) if spec["name"] == "centered_clip" else None
    uninterrupted = simulate(STRATEGIES.build(spec), PROBLEM, 8, attack=attack, byzantine=frozenset({3}), **kwargs)
    first = simulate(STRATEGIES.build(spec), PROBLEM, 4, attack=attack, byzantine=frozenset({3}), **kwargs)
    assert first.server_state or first.store, "a stateful strategy keeps state"
    resumed = simulate(STRATEGIES.build(spec), PROBLEM, 4, attack=attack, byzantine=frozenset({3}),
                       start=through_disk(first, tmp_path), **kwargs)
    assert torch.equal(resumed.x, uninterrupted.x)
    assert resumed.server_state.keys() == uninterrupted.server_state.keys()
    assert all(torch.equal(resumed.server_state[k], uninterrupted.server_state[k]) for k in resumed.server_state)

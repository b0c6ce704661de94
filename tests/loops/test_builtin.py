"""The built-in loop's speed options change speed, not results: the fused AdamW kernel follows
the for-loop AdamW, torch.compile trains the same adapter, and a run may write no checkpoint."""
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from fedllm.engine import run_recipe
from fedllm.training import make_optimizer


def options(**kw):
    return SimpleNamespace(**{"optim": "adamw", "momentum": 0.0, "weight_decay": 0.01, "fused_optimizer": True, **kw})


def trained(cfg, steps=20):
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(32, 16))
    optimizer = make_optimizer(cfg, [param], lr=1e-2)
    for step in range(steps):
        param.grad = torch.sin(param.detach() * (step + 1))  # a deterministic gradient field
        optimizer.step()
    return optimizer, param.detach()


@pytest.mark.parametrize("optim", ["adamw", "sgd"])
def test_the_fused_kernel_follows_the_for_loop_optimizer(optim):
    fused, fused_param = trained(options(optim=optim, momentum=0.9 if optim == "sgd" else 0.0))
    plain, plain_param = trained(options(optim=optim, momentum=0.9 if optim == "sgd" else 0.0, fused_optimizer=False))
    assert fused.defaults["fused"] is True and not plain.defaults.get("fused")
    assert not torch.equal(fused_param, trained(options(), steps=19)[1])  # 20 steps moved it
    torch.testing.assert_close(fused_param, plain_param, rtol=1e-5, atol=1e-6)


def test_checkpoints_false_writes_no_checkpoint_and_still_exports(recipe_file, tmp_path):
    run_dir = run_recipe(str(recipe_file(output={"checkpoints": False}, federation={"rounds": 2})))
    assert not any((run_dir / "checkpoints").glob("round_*"))
    assert load_file(str(run_dir / "final" / "adapter_model.safetensors"))
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2


def inductor_works() -> str | None:
    """Why torch.compile cannot run here (inductor on the CPU needs a working C++ toolchain), or None."""
    if shutil.which("cc") is None and shutil.which("gcc") is None and shutil.which("g++") is None:
        return "no C compiler"
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(3))
    except Exception as err:  # noqa: BLE001 (any toolchain failure means: not here)
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return None


@pytest.mark.slow
def test_torch_compile_trains_the_same_adapter(recipe_file):
    why = inductor_works()
    if why:
        pytest.skip(f"torch.compile cannot run on this machine ({why})")
    sections = dict(federation={"rounds": 1, "num_clients": 2, "clients_per_round": 1}, eval={"every": 0, "max_batches": 1})
    eager = run_recipe(str(recipe_file(**sections, client={"max_steps": 2}, output={"name": "eager"})))
    compiled = run_recipe(str(recipe_file(**sections, client={"max_steps": 2, "torch_compile": True}, output={"name": "compiled"})))
    a, b = (load_file(str(d / "final" / "adapter_model.safetensors")) for d in (eager, compiled))
    assert a.keys() == b.keys()
    assert max(a[k].abs().max().item() for k in a if "lora_B" in k) > 0  # trained away from B = 0
    for key in a:  # the compiled graph reorders float sums: equal to float32 rounding, not bitwise
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)

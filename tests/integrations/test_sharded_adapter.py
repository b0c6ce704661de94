"""The Trainer callback under FSDP reads the adapter whole from the shards and writes the new
global adapter back into them (fedllm.distributed.gather_trainable / scatter_trainable_):
checked on CPU with torch's FSDP2 over gloo, on a LoRA model whose adapter is sharded too."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.engine.test_distributed import free_port


def _lora():
    from fedllm.adapters.lora import LoRA
    from fedllm.models import byte_tokenizer, load_model
    from fedllm.recipe import ModelConfig

    return LoRA(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]).attach(
        load_model(ModelConfig(), byte_tokenizer(), seed=0), seed=0)


def _worker(rank, port, out):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from fedllm.distributed import gather_trainable, scatter_trainable_

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model = _lora()
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    shards = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(type(p).__name__ == "DTensor" for p in shards.values())  # the adapter itself is sharded
    gathered = gather_trainable(model)
    new = {k: t + 0.25 * (1 + i) for i, (k, t) in enumerate(sorted(gathered.items()))}
    scatter_trainable_(model, new)
    regathered = gather_trainable(model)
    save_file({**{f"gathered/{k}": t for k, t in gathered.items()}, **{f"after/{k}": t for k, t in regathered.items()},
               **{f"new/{k}": t.contiguous() for k, t in new.items()}}, f"{out}/rank{rank}.safetensors")
    dist.destroy_process_group()


def part(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: t for k, t in state.items() if k.startswith(prefix)}


def assert_sharded_trainer_is_one_fedavg_client(out: Path, mode: str) -> None:
    """Runs sharded_trainer_worker.py on 2 ranks sharded as `mode` says (fsdp, zero2, zero3) and
    checks that they were ONE client that trained: after every sync both ranks hold the same
    global adapter, fedavg's server step from the adapter they trained together."""
    worker = str(Path(__file__).with_name("sharded_trainer_worker.py"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", worker, str(out), mode]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    r0, r1 = (load_file(str(out / f"{mode}_rank{r}.safetensors")) for r in (0, 1))
    x = part(r0, "init/")
    for step in (2, 4):  # fedavg with server_lr 0.5 and one client: x^{t+1} = x^t + 0.5 (w − x^t)
        local, new = part(r0, f"local/{step}/"), part(r0, f"global/{step}/")
        assert all(torch.equal(new[k], part(r1, f"global/{step}/")[k]) for k in new)  # one client: identical ranks
        assert any(not torch.equal(local[k], x[k]) for k in x)  # it trained
        for k in x:
            torch.testing.assert_close(new[k], x[k] + 0.5 * (local[k] - x[k]), rtol=1e-5, atol=1e-7)
        x = new


@pytest.mark.slow
def test_the_adapter_is_gathered_whole_from_fsdp_shards_and_scattered_back(tmp_path):
    torch.multiprocessing.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    whole = {n: p.detach() for n, p in _lora().named_parameters() if p.requires_grad}
    for state in ranks:
        gathered, after, new = part(state, "gathered/"), part(state, "after/"), part(state, "new/")
        assert gathered.keys() == whole.keys()  # the unwrapped names, on every rank
        assert all(torch.equal(gathered[k], whole[k]) for k in whole)
        assert all(torch.equal(after[k], new[k]) for k in new)  # each shard took its part of the new global


class _Accelerator:
    def __init__(self, kind: str):
        self.distributed_type = kind


class _Trainer:
    def __init__(self, kind: str):
        self.accelerator = _Accelerator(kind)


def test_fsdp_and_deepspeed_make_the_ranks_one_client_and_ddp_makes_each_rank_one():
    from fedllm.integrations.transformers import sharding

    assert sharding(_Trainer("DistributedType.FSDP")) == "fsdp"
    assert sharding(_Trainer("DistributedType.DEEPSPEED")) == "deepspeed"
    assert sharding(_Trainer("DistributedType.MULTI_CPU")) is None


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="a Trainer runs FSDP only on GPUs (on CPU it falls back to "
                    "DDP); the CPU test above checks the gather/scatter itself")
def test_a_trainer_under_fsdp_is_one_client_whose_global_adapter_is_scattered_back(tmp_path):
    assert_sharded_trainer_is_one_fedavg_client(tmp_path, "fsdp")

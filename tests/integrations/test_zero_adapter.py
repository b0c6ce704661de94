"""The Trainer callback under DeepSpeed ZeRO-2/3 reads the adapter whole from a DeepSpeed
engine and writes the new global adapter back into it (fedllm.zero.gather_trainable /
scatter_trainable_): into the weights (ZeRO-3: their partitions) AND into the optimizer's fp32
master copy, else the next optimizer step would copy the old values back. Checked on CPU with
DeepSpeed's CPU accelerator over gloo, 2 ranks, a LoRA model and a plain torch AdamW."""
import importlib.util
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.engine.test_distributed import free_port
from tests.integrations.test_sharded_adapter import _lora, assert_sharded_trainer_is_one_fedavg_client, part

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                reason="DeepSpeed is not installed (pip install deepspeed; on CPU it runs over gloo)")


def _worker(rank, port, stage, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import deepspeed

    from fedllm import zero

    deepspeed.init_distributed(dist_backend="gloo")
    model = _lora()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=0.1, weight_decay=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config={
        **zero.config(stage), "zero_allow_untested_optimizer": True})
    gathered = zero.gather_trainable(engine)
    new = {k: t + 0.25 * (1 + i) for i, (k, t) in enumerate(sorted(gathered.items()))}
    zero.scatter_trainable_(engine, new)
    after = zero.gather_trainable(engine)
    # a step whose gradients are all zero leaves AdamW's weights where they are, unless the
    # optimizer's master copy still held the old values (the step writes it back to the weights)
    ids = torch.arange(8).reshape(1, 8) + 3
    engine.backward(engine(input_ids=ids, labels=ids).loss * 0.0)
    engine.step()
    stepped = zero.gather_trainable(engine)
    save_file({**{f"gathered/{k}": t for k, t in gathered.items()}, **{f"after/{k}": t for k, t in after.items()},
               **{f"stepped/{k}": t for k, t in stepped.items()}, **{f"new/{k}": t.contiguous() for k, t in new.items()}},
              f"{out}/rank{rank}.safetensors")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_the_adapter_is_gathered_whole_from_a_zero_engine_and_written_back_into_weights_and_masters(tmp_path, stage):
    torch.multiprocessing.spawn(_worker, args=(free_port(), stage, str(tmp_path)), nprocs=2)
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    whole = {n: p.detach() for n, p in _lora().named_parameters() if p.requires_grad}
    for state in ranks:
        gathered, after, stepped, new = (part(state, f"{w}/") for w in ("gathered", "after", "stepped", "new"))
        assert gathered.keys() == whole.keys()  # the model's names, on every rank
        assert all(torch.equal(gathered[k], whole[k]) for k in whole)
        assert all(torch.equal(after[k], new[k]) for k in new)  # every partition took its part of the new global
        for k in new:  # and the master copy too (AdamW's zero-gradient step moves nothing)
            torch.testing.assert_close(stepped[k], new[k], rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_a_trainer_under_deepspeed_is_one_client_whose_global_adapter_is_written_back(tmp_path, stage):
    assert_sharded_trainer_is_one_fedavg_client(tmp_path, f"zero{stage}")

"""Gradient checkpointing (client.gradient_checkpointing) inside a client group whose base is
sharded (fsdp) or partitioned (zero3): the backward recomputes each block's forward, which must
gather the block's weights again, and the run ends where one rank training each client with
twice the batch, without checkpointing, ends. fedllm checkpoints non-reentrantly
(models.build_model); measured: adapter gradients bitwise equal with and without it in both
kinds of group."""
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_recipe
from tests.engine.test_groups import assert_rank0_held_half, assert_same_run, launch, reference  # noqa: F401  (a fixture)
from tests.engine.test_zero_build import launch_worker
from tests.engine.test_zero_groups import needs_deepspeed

WORKER = str(Path(__file__).with_name("group_ckpt_worker.py"))
CHECKPOINTING = "client.gradient_checkpointing=true"


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["fsdp", pytest.param("zero3", marks=needs_deepspeed)])
def test_checkpointing_in_a_sharded_group_trains_as_one_rank_with_twice_the_batch(reference, parallel):  # noqa: F811
    path, one_dir = reference
    run_dir = launch(path, 2, f"{parallel}_ckpt", "federation.group_size=2", f"federation.group_parallel={parallel}",
                     CHECKPOINTING)
    assert_same_run(run_dir, one_dir)
    assert_rank0_held_half(run_dir, one_dir)


@pytest.mark.slow
@pytest.mark.parametrize("split", [  # fsdp with the whole load on every rank: the run above
    pytest.param({"group_parallel": "fsdp", "fsdp_load": "leader"}, id="fsdp_leader_load"),
    pytest.param({"group_parallel": "zero3"}, marks=needs_deepspeed, id="zero3")])
def test_the_backward_recomputes_each_block_with_the_gradients_of_no_checkpointing(tmp_path, split):
    # per rank, one step on one batch: each block's forward runs again in the backward, and
    # re-gathers the block's weights for it (else the gradients would differ or the step fail)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tmp_path, federation={"group_size": 2, **split})))
    for rank in launch_worker(tmp_path / "out", 2, path, worker=WORKER):
        assert rank["plain_blocks"] == 2, rank
        assert rank["ckpt_calls_per_module"] == 2 * rank["plain_calls_per_module"] > 0, rank
        assert rank["ckpt_loss"] == rank["plain_loss"]
        assert rank["grad_max_abs"] > 1e-4 and rank["grad_max_abs_diff"] <= 1e-6 * rank["grad_max_abs"], rank

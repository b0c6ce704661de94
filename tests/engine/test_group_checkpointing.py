"""Gradient checkpointing (client.gradient_checkpointing) inside a client group whose base is
sharded (fsdp) or partitioned (zero3): the backward recomputes each block's forward, which must
gather the block's weights again, and the run ends where one rank training each client with
twice the batch, without checkpointing, ends."""

import pytest

from tests.engine.test_groups import assert_rank0_held_half, assert_same_run, launch, reference  # noqa: F401  (a fixture)
from tests.engine.test_zero_groups import needs_deepspeed

CHECKPOINTING = "client.gradient_checkpointing=true"


@pytest.mark.slow
def test_checkpointing_in_an_fsdp_group_trains_as_one_rank_with_twice_the_batch(reference):  # noqa: F811
    path, one_dir = reference
    run_dir = launch(path, 2, "fsdp_ckpt", "federation.group_size=2", "federation.group_parallel=fsdp", CHECKPOINTING)
    assert_same_run(run_dir, one_dir)
    assert_rank0_held_half(run_dir, one_dir)


@pytest.mark.slow
@needs_deepspeed
def test_checkpointing_in_a_zero3_group_trains_as_one_rank_with_twice_the_batch(reference):  # noqa: F811
    path, one_dir = reference
    run_dir = launch(path, 2, "zero3_ckpt", "federation.group_size=2", "federation.group_parallel=zero3", CHECKPOINTING)
    assert_same_run(run_dir, one_dir)
    assert_rank0_held_half(run_dir, one_dir)

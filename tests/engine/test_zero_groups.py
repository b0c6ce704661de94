"""Client groups under DeepSpeed ZeRO-3 (federation.group_parallel=zero3): the frozen base is
partitioned over the group's ranks, the adapter held whole, and the run ends where one rank
training each client with G times the batch ends. Runs wherever DeepSpeed imports (on CPU its
CPU accelerator over gloo); CI's main step does not install it, so there these tests skip."""
import json

import pytest

from tests.engine.test_groups import assert_same_run, launch, reference  # noqa: F401  (a fixture)

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed; on CPU it runs over gloo)")


@pytest.mark.slow
def test_a_group_partitioning_the_base_with_zero3_trains_as_one_rank(reference):  # noqa: F811
    path, one_dir = reference
    run_dir = launch(path, 2, "zero3", "federation.group_size=2", "federation.group_parallel=zero3")
    assert_same_run(run_dir, one_dir)
    # the base really was partitioned: rank 0 held about half of the model (plus the whole adapter)
    held, whole = (json.loads((d / "run_meta.json").read_text())["client_group"]["rank0_parameter_bytes"]
                   for d in (run_dir, one_dir))
    assert 0.45 * whole < held < 0.55 * whole

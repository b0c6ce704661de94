"""`fedllm run --processes N`: N ranks on this machine, forked from one process that has
already imported torch, transformers and peft, instead of `torchrun --nproc-per-node N`,
whose agent imports torch itself and whose N workers each import the whole stack again.
On CPU the imports are most of a short run's start-up (about 8 s of CPU per process), and
forked ranks share the imported modules' memory pages until they write them.

Each rank gets the environment torchrun gives it (RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and builds the process group itself, as under
torchrun; one machine only (several machines: `torchrun` / `accelerate launch`). As under
torchrun, the first rank to fail ends the others and its exit status is the launch's.

Forking is safe only before any CUDA context, OpenMP pool or tokenizer thread exists in the
parent: the parent imports and validates the recipe, nothing else, and refuses to fork once
CUDA is initialised."""
from __future__ import annotations

import atexit
import ctypes
import multiprocessing
import os
import signal
import socket
import sys
import time
from typing import Callable

RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_can_fork(processes: int) -> None:
    """One-line refusals, before any rank exists."""
    import torch

    from fedllm.registry import RecipeError

    if processes < 1:
        raise RecipeError(f"--processes {processes}: give the number of ranks to start on this machine (1 or more)")
    launched = [v for v in ("RANK", "WORLD_SIZE") if v in os.environ]
    if launched:
        raise RecipeError(f"--processes inside a launched rank ({launched[0]} is set): start either with torchrun / "
                          "accelerate launch or with fedllm run --processes, not both")
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        raise RecipeError("--processes: CUDA is already initialised in this process, and a forked rank cannot use it; "
                          "launch with torchrun --nproc-per-node N instead")
    if torch.cuda.is_available() and processes > torch.cuda.device_count():
        raise RecipeError(f"--processes {processes} on {torch.cuda.device_count()} visible GPU(s): start at most one rank "
                          "per GPU")


def _die_with_parent() -> None:
    """A rank ends when the launching process dies, even by SIGKILL (Linux; elsewhere a no-op)."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _rank_main(rank: int, world: int, port: int, command: Callable[[], int]) -> None:
    _die_with_parent()
    atexit._clear()  # the launcher's exit handlers are its own (a test runner's removes its temporary folders)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        code = command()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        atexit._run_exitfuncs()  # those the rank registered (a forked child skips them otherwise)
    sys.exit(code)


def fork_ranks(processes: int, command: Callable[[], int]) -> int:
    """Runs `command` (the CLI verb, returning an exit status) on `processes` forked ranks and
    returns the launch's exit status: 0, or the first failed rank's."""
    check_can_fork(processes)
    port, context = free_port(), multiprocessing.get_context("fork")
    sys.stdout.flush()
    sys.stderr.flush()  # buffered output would be written once per rank
    ranks = [context.Process(target=_rank_main, args=(rank, processes, port, command), name=f"fedllm-rank{rank}")
             for rank in range(processes)]
    for rank in ranks:
        rank.start()
    try:
        return _wait(ranks)
    except KeyboardInterrupt:
        return 130
    finally:
        _end(ranks)


def _wait(ranks: list) -> int:
    """Until every rank ends; the first failure ends the others (they would wait on it in their next
    collective until federation.collective_timeout_s)."""
    from multiprocessing.connection import wait

    while True:
        codes = [r.exitcode for r in ranks]
        failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            rank, code = failed[0]
            alive = sum(c is None for c in codes)
            if alive:
                print(f"fedllm: rank {rank} of {len(ranks)} ended with status {code}; ending the other {alive} rank(s)",
                      file=sys.stderr)
            return code if code > 0 else 128 - code  # killed by a signal: 128 + its number, as a shell says
        if all(c == 0 for c in codes):
            return 0
        wait([r.sentinel for r, c in zip(ranks, codes) if c is None])  # ready at once for a rank that ended since


def _end(ranks: list, grace_s: float = 10.0) -> None:
    for r in ranks:
        if r.exitcode is None:
            r.terminate()
    deadline = time.monotonic() + grace_s
    for r in ranks:
        r.join(max(0.0, deadline - time.monotonic()))
        if r.exitcode is None:
            r.kill()
            r.join()

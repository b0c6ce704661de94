"""How many threads torch uses for one process's CPU kernels: chosen, not left to torch's
default (every physical core of the machine). On a shared or busy machine that default makes
a small model many times slower: each matmul waits for the slowest of its threads, and a
thread that loses its core stalls the others. torchrun and accelerate set one per process."""
from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("fedllm")

# Below about this many parameters per thread a matmul is too small to split: the threads'
# start-up and barrier cost more than the work they share (tiny-llama: one thread).
PARAMS_PER_THREAD = 20_000_000


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's or taskset's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def ranks_on_this_machine() -> int:
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))  # torchrun and accelerate set it


def choose_threads(requested: int | None, num_parameters: int) -> tuple[int, str]:
    """(threads, why): the recipe's or command line's number, else OMP_NUM_THREADS, else this
    rank's share of the usable cores, no more than the model's size can keep busy."""
    if requested:
        return requested, "client.threads / --threads"
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    cores, ranks = usable_cores(), ranks_on_this_machine()
    share = max(1, cores // ranks)
    threads = min(share, max(1, num_parameters // PARAMS_PER_THREAD))
    return threads, (f"{cores} usable core(s) / {ranks} rank(s) on this machine, "
                     f"{num_parameters / 1e6:.1f}M parameters: one thread per {PARAMS_PER_THREAD // 10**6}M")


def share_tokenizer_threads() -> None:
    """Ranks on one machine split its cores for the fast tokenizer too: its thread pool
    (rayon) otherwise takes every core in every rank while each rank prepares the data.
    Read when the pool starts, at the first batch tokenized, so this comes before."""
    ranks = ranks_on_this_machine()
    if ranks > 1:
        os.environ.setdefault("RAYON_NUM_THREADS", str(max(1, usable_cores() // ranks)))


def set_threads(requested: int | None, model: torch.nn.Module) -> int:
    threads, why = choose_threads(requested, sum(p.numel() for p in model.parameters()))
    torch.set_num_threads(threads)
    share_tokenizer_threads()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    busy = f"; the machine is busy (load {load:.1f} on {os.cpu_count()} cores)" if load > (os.cpu_count() or 1) else ""
    log.info("torch threads: %d (%s%s; set client.threads or --threads to change)", threads, why, busy)
    return threads

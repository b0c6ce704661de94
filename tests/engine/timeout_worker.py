"""Rank 1 freezes; rank 0's collective must give up after `timeout_s` (argv[1])."""
import sys
import time

import torch

from fedllm.distributed import all_reduce_sum_, process_state

state = process_state(float(sys.argv[1]))
if state.process_index == 1:
    time.sleep(120)  # a frozen rank
start = time.time()
try:
    all_reduce_sum_(torch.ones(1), state.device)
except Exception as err:  # gloo raises on the timeout
    print(f"rank 0 gave up after {time.time() - start:.1f} s ({type(err).__name__})", flush=True)
    sys.exit(3)
print("rank 0 waited forever", flush=True)

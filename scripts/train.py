"""accelerate entry point: `accelerate launch [--num_processes W] scripts/train.py RECIPE [k=v ...]`
(or `--resume RUN_DIR`). Every rank runs the same engine; the round's clients are split
over the ranks and aggregated with torch.distributed collectives."""
import sys

from fedllm.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0] == "--resume":
        raise SystemExit(main(["resume", *args[1:]]))
    raise SystemExit(main(["run", *args]))

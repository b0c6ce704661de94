#!/usr/bin/env bash
# Issue 18's GPU checks, each printing PASS / FAIL / SKIP and fedllm's tokens/s next to a
# bare peft + accelerate loop doing the same steps (bench/gpu_compare.py; goal: within 10%):
#   bf16, QLoRA 4-bit and 8-bit bases (bitsandbytes), device_map splitting, DP-SGD through
#   torch.func on CUDA; then, with 2 GPUs, NCCL ranks and one client group of 2 GPUs under
#   DDP, FSDP and DeepSpeed ZeRO-3 (accelerate launch with bench/accelerate/ddp.yaml).
#
#   bench/gpu_check.sh [--size tiny|small|medium]      PYTHON=... to pick the interpreter
#
# Exits 0 with "no CUDA: skipped" on a machine without a GPU, 1 when a check fails.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
py=${PYTHON:-python}
size=small
if [ "${1:-}" = "--size" ] && [ -n "${2:-}" ]; then
  size=$2
fi

if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "no CUDA: skipped"
  exit 0
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/fedllm-gpu-check.XXXXXX")
trap 'rm -rf "$work"' EXIT
failed=0
gpus=$("$py" -c 'import torch; print(torch.cuda.device_count())')
echo "fedllm GPU checks: $gpus GPU(s), $("$py" -c 'import torch; print(torch.cuda.get_device_name(0))'), size $size"

have() {  # a Python module is importable
  "$py" -c "import $1" 2>/dev/null
}

compare() {  # CHECK: fedllm vs the bare loop, in this process
  "$py" bench/gpu_compare.py "$1" --device cuda --size "$size" 2>"$work/$1.err" || {
    failed=1
    tail -n 3 "$work/$1.err"
  }
}

launch() {  # NAME CONFIG [OVERRIDE ...]: a launched run, then its last round against the bare loop
  local name=$1 config=$2
  shift 2
  if accelerate launch --config_file "$config" scripts/train.py "$work/recipe.yaml" \
      output.dir="$work/runs" output.name="$name" "$@" >"$work/$name.log" 2>&1; then
    "$py" bench/gpu_compare.py run --check "$name" --run-dir "$work/runs/$name" --device cuda 2>>"$work/$name.log" || failed=1
  elif grep -q "unknown key 'federation.group_size'" "$work/$name.log"; then
    printf '%-11s SKIP  federation.group_size is not in this fedllm yet (client groups)\n' "$name"
  else
    printf '%-11s FAIL  accelerate launch failed; its last lines:\n' "$name"
    tail -n 5 "$work/$name.log"
    failed=1
  fi
}

compare bf16
if have bitsandbytes; then
  compare 4bit
  compare 8bit
else
  printf '%-11s SKIP  bitsandbytes is not installed (pip install "fedllm[gpu]")\n' "4bit/8bit"
fi
compare device_map
compare dp_sgd

if [ "$gpus" -lt 2 ]; then
  printf '%-11s SKIP  needs 2 GPUs (found %s): NCCL ranks, DDP and FSDP client groups\n' "multi-GPU" "$gpus"
else
  "$py" bench/gpu_compare.py recipe --out "$work/recipe.yaml" --dir "$work" --size "$size" || exit 1
  launch nccl bench/accelerate/ddp.yaml
  # client groups take their parallelism from the recipe (federation.group_parallel), not from
  # the accelerate config: the launch is a plain 2-process one in both cases
  launch group_ddp bench/accelerate/ddp.yaml federation.group_size=2 federation.group_parallel=ddp
  launch fsdp bench/accelerate/ddp.yaml federation.group_size=2 federation.group_parallel=fsdp
  if have deepspeed; then
    launch zero3 bench/accelerate/ddp.yaml federation.group_size=2 federation.group_parallel=zero3
  else
    printf '%-11s SKIP  DeepSpeed is not installed (pip install "fedllm[gpu]")\n' "zero3"
  fi
fi

exit "$failed"

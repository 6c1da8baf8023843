#!/usr/bin/env bash
# Train on every GPU of this machine, or on 2 CPU processes when there is none.
#   launch/train.sh --config configs/digits_cpu.yaml [key.sub=value ...]
# Set NUM_PROCESSES to choose the count yourself.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
gpus=$(python -c 'import torch; print(torch.cuda.device_count())')
n=${NUM_PROCESSES:-$gpus}
if [ "$gpus" -eq 0 ]; then
  exec accelerate launch --config_file "$here/cpu-ddp.yaml" --num_processes "${NUM_PROCESSES:-2}" -m dist_train train "$@"
elif [ "$n" -eq 1 ]; then
  exec accelerate launch --config_file "$here/gpu.yaml" -m dist_train train "$@"
else
  exec accelerate launch --config_file "$here/gpus-bf16.yaml" --num_processes "$n" -m dist_train train "$@"
fi

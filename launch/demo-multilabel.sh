#!/usr/bin/env bash
# The multi-label demo under 2-process CPU DDP: sklearn's digits, each image tagged with the
# properties of its digit (configs/digit_tags_cpu.yaml) -> shards -> training on two processes
# (gloo) -> eval -> predictions with each label's probability. After `make install`:
#   PATH=$PWD/.venv/bin:$PATH bash launch/demo-multilabel.sh [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."

data=data/digit_tags
run=runs/demo-multilabel
if [ ! -f "$data/dataset.json" ]; then
  dist-train make-shards --source digit-tags --out "$data" --shard-size 256 --val-fraction 0.2 --seed 0
fi
rm -rf "$run"  # the demo always starts fresh
accelerate launch --config_file launch/cpu-ddp.yaml -m dist_train train --config configs/digit_tags_cpu.yaml \
  "data.train=$data" "data.val=$data" "train.output_dir=$run" "$@"
echo "== eval of $run/best on the validation split"
dist-train eval --checkpoint "$run/best" --data "$data"
dist-train predict --checkpoint "$run/best" --input "$data/val-000001.tar" --out "$run/predictions.csv"
head -n 4 "$run/predictions.csv"
echo "== per label (best epoch; plots and summary.md in $run)"
dist-train report "$run" | head -n -2

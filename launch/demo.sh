#!/usr/bin/env bash
# The end-to-end demo on one CPU: real handwritten digits (bundled with scikit-learn) ->
# webdataset shards -> training with validation every epoch -> best checkpoint -> eval ->
# predictions. Run it through `make demo`, which installs everything first.
set -euo pipefail
cd "$(dirname "$0")/.."

data=data/digits
run=runs/demo
if [ ! -f "$data/dataset.json" ]; then
  dist-train make-shards --source digits --out "$data" --shard-size 256 --val-fraction 0.2 --seed 0
fi
rm -rf "$run"  # the demo always starts fresh; real runs refuse to overwrite a run directory
dist-train train --config configs/digits_cpu.yaml "data.train=$data" "data.val=$data" "train.output_dir=$run" "$@"
echo "== eval of $run/best on the validation split"
dist-train eval --checkpoint "$run/best" --data "$data"
dist-train predict --checkpoint "$run/best" --input "$data/val-000001.tar" --out "$run/predictions.csv"
head -n 4 "$run/predictions.csv"
echo "== export to ONNX (checked against PyTorch on export), and the same predictions from it"
dist-train export --checkpoint "$run/best" --format onnx --out "$run/model.onnx"
dist-train predict --checkpoint "$run/model.onnx" --input "$data/val-000001.tar" --out "$run/predictions-onnx.csv"
# Same source, label and predicted class on every row (probabilities agree to ~1e-7).
if diff <(cut -d, -f1-3 "$run/predictions.csv") <(cut -d, -f1-3 "$run/predictions-onnx.csv") >/dev/null; then
  echo "the ONNX model predicts the same class as the checkpoint for every image"
else
  echo "the ONNX model's predictions differ from the checkpoint's" >&2
  exit 1
fi

"""Run under `accelerate launch` (2 CPU processes, 2 DataLoader workers each): evaluate a
fixed model on uneven shards through dist-train's `evaluate`, then dump each rank's own
outputs (logits, labels, sample keys) so the test can recompute the metrics over the
union with scikit-learn and check that no sample was seen twice or missed. With
`--multilabel-shards`, the same again for a multi-label model on multi-label shards, into
`<out>/multilabel`."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from dist_train.config import DataConfig, TrainConfig
from dist_train.data import workers
from dist_train.data.labels import label_reader
from dist_train.data.pipeline import EvalStreamSpec, make_eval_loader
from dist_train.data.resolve import resolve_shards
from dist_train.recipe.metrics import MultilabelValidationMetrics, ValidationMetrics
from dist_train.recipe.models import SmallCNN
from dist_train.runtime.accelerator import make_accelerator
from dist_train.training.engine import evaluate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--multilabel-shards")
    parser.add_argument("--num-labels", type=int, default=5)
    args = parser.parse_args()
    # As `dist-train train` does: the workers' fork server forked from here, before the
    # accelerator starts gloo's threads; an exec'd one would have every worker import this
    # script, torch and all, again (2.4 s a loader here).
    workers.fork_server_from_here()
    accelerator = make_accelerator(TrainConfig(cpu=True))
    check(accelerator, args.shards, args.num_classes, Path(args.out), multilabel=False)
    if args.multilabel_shards:
        (Path(args.out) / "multilabel").mkdir(exist_ok=True)
        check(accelerator, args.multilabel_shards, args.num_labels, Path(args.out) / "multilabel", multilabel=True)


def check(accelerator, pattern: str, num_classes: int, out: Path, multilabel: bool) -> None:
    task = "multilabel" if multilabel else "multiclass"
    data_cfg = DataConfig(num_workers=2, image_size=8, channels=1, mean=[0.25], std=[0.35], augment="none", task=task)
    shards = resolve_shards(pattern, "val", num_classes, labels=label_reader(data_cfg, num_classes))
    spec = EvalStreamSpec(shards, batch_size=7, num_classes=num_classes,
                          rank=accelerator.process_index, world_size=accelerator.num_processes)
    torch.manual_seed(0)  # the same weights on every rank, without DDP
    model = SmallCNN(num_classes, in_channels=1)
    metrics = MultilabelValidationMetrics(num_classes, threshold=0.5) if multilabel else ValidationMetrics(num_classes)
    values, confusion = evaluate(model, make_eval_loader(spec, data_cfg), metrics, accelerator)
    # Flip test-time augmentation (data.tta=flip), synced the same way; its logits averaged by hand below.
    tta_values, _ = evaluate(model, make_eval_loader(spec, data_cfg), metrics, accelerator, tta="flip")

    keyed = replace(spec, with_keys=True)
    logits, tta_logits, labels, keys = [], [], [], []
    with torch.no_grad():
        for images, batch_labels, batch_keys in make_eval_loader(keyed, data_cfg):
            logits.append(model(images))
            tta_logits.append((model(images) + model(torch.flip(images, dims=[3]))) / 2)
            labels.append(batch_labels)
            keys.extend(batch_keys)
    rank = accelerator.process_index
    torch.save({"logits": torch.cat(logits), "tta_logits": torch.cat(tta_logits), "labels": torch.cat(labels)},
               out / f"outputs-rank{rank}.pt")
    (out / f"keys-rank{rank}.json").write_text(json.dumps(keys))
    if accelerator.is_main_process:
        (out / "synced.json").write_text(json.dumps({"values": values, "confusion": confusion, "tta_values": tta_values,
                                                     "world_size": accelerator.num_processes}))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()

"""Evaluate a saved model on shards, with the validation code training uses."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from dist_train.data.datasets import cache_if_remote, check_task
from dist_train.data.labels import label_reader
from dist_train.data.pipeline import EvalStreamSpec, device_stage, make_eval_loader
from dist_train.data.resolve import resolve_shards
from dist_train.recipe.metrics import validation_metrics
from dist_train.runtime.accelerator import make_accelerator
from dist_train.runtime.progress_lines import Progress
from dist_train.training.engine import evaluate


def evaluate_checkpoint(checkpoint: str | Path, data: str, split: str = "val", batch_size: int | None = None):
    """Metrics of a saved model on shards: (values, confusion matrix or, for a multi-label model,
    per-label scores, samples, the test-time augmentation: data.tta). Works in one process
    or under `accelerate launch`, where each rank evaluates its share and metrics are synced."""
    from dist_train.commands.predict import load_for_inference

    loaded = load_for_inference(checkpoint)
    cfg, num_classes = loaded.cfg, len(loaded.class_names)
    # The precision the run validated with, so that the numbers reproduce.
    precision = loaded.meta.get("mixed_precision", "no")
    accelerator = make_accelerator(replace(cfg.train, mixed_precision=precision, grad_accum_steps=1))
    shards = resolve_shards(data, split, num_classes, cache=cache_if_remote([data], cfg.data),
                            labels=label_reader(cfg.data, num_classes))
    check_task(shards, cfg.data.task, data)
    spec = EvalStreamSpec(shards, num_classes=num_classes,
                          batch_size=batch_size or cfg.data.val_batch_size or cfg.data.batch_size,
                          rank=accelerator.process_index, world_size=accelerator.num_processes)
    metrics = validation_metrics(cfg, num_classes, accelerator.device)
    model = loaded.model.to(accelerator.device)
    stage = device_stage(cfg.data, accelerator.device)  # CUDA: uint8 batches, finished there
    loader = make_eval_loader(spec, cfg.data, pin_memory=accelerator.device.type == "cuda",
                              for_device_stage=stage is not None)
    # The main process's share, counted for all: the ranks' shares are of one size within a batch.
    progress = Progress("eval", shards.samples, enabled=accelerator.is_main_process)
    values, confusion = evaluate(model, loader, metrics, accelerator, stage, cfg.data.tta,
                                 on_batch=lambda n: progress.advance(n * accelerator.num_processes))
    progress.close()
    return values, confusion, shards.samples, cfg.data.tta

"""What a validation's metrics cost with exact AUROC (`train.auroc`, the default) and without:
the seconds of `update` over every batch and of `compute`, and the bytes of the metrics' state,
at ImageNet's validation shape (50,000 images, 1,000 classes, batches of 250) in one process.

    python -m benchmarks.bench_metrics                  # ImageNet's shape, 3 alternating repeats
    python -m benchmarks.bench_metrics --samples 1000 --classes 10   # the digits' shape

The logits are random, so every class is predicted: the work is what a trained model's would be
(exact AUROC sorts each class's scores whatever they are). The model's forward is not timed:
this is what validation adds to it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from dist_train.recipe.metrics import ValidationMetrics


def state_bytes(metrics: ValidationMetrics) -> int:
    """Bytes the metrics hold after the updates (tensor states and lists of them)."""
    parts = [*metrics.scores.values(), metrics.confusion, metrics.loss, *([metrics.top_k] if metrics.top_k else [])]
    total = 0
    for metric in parts:
        for name in metric._defaults:
            state = getattr(metric, name)
            for tensor in state if isinstance(state, list) else [state]:
                total += tensor.numel() * tensor.element_size()
    return total


def one_validation(logits: torch.Tensor, labels: torch.Tensor, batch: int, auroc: bool) -> dict[str, float]:
    metrics = ValidationMetrics(logits.shape[1], auroc=auroc)
    started = time.perf_counter()
    for start in range(0, len(labels), batch):
        metrics.update(logits[start:start + batch], labels[start:start + batch])
    updated = time.perf_counter()
    held = state_bytes(metrics)
    metrics.compute()
    return {"update_s": updated - started, "compute_s": time.perf_counter() - updated, "state_mb": held / 2**20}


def measure(samples: int, classes: int, batch: int, repeats: int) -> dict[str, dict[str, float]]:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(samples, classes, generator=generator)
    labels = torch.randint(0, classes, (samples,), generator=generator)
    runs: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    for repeat in range(repeats):
        for auroc in (True, False) if repeat % 2 == 0 else (False, True):
            runs[auroc].append(one_validation(logits, labels, batch, auroc))
    return {("with_auroc" if auroc else "without_auroc"): {key: round(statistics.median(r[key] for r in results), 3)
                                                          for key in results[0]}
            for auroc, results in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=50_000)
    parser.add_argument("--classes", type=int, default=1_000)
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    figures = measure(args.samples, args.classes, args.batch, args.repeats)
    figures["threads"] = torch.get_num_threads()
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

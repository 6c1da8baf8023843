"""The baseline of the whole-run comparison (benchmarks/bench_whole_run.py): what timm's
`train.py` does on one CPU process, written with timm's own parts as that script uses them.

Per epoch, as `train.py`: `train_one_epoch` (a loss meter read with `.item()` every step, the
LR schedule stepped per update, a log line every 50 updates), `validate` (loss, top-1 and
top-5 with `timm.utils.accuracy`), `update_summary` (summary.csv) and timm's `CheckpointSaver`
(`torch.save` of model, optimizer and args; the best kept as model_best.pth.tar). Data: timm's
`create_dataset` over an ImageFolder (DIR/train/<class>/*, DIR/val/<class>/*) and
`create_loader` with its workers (no augmentation: `no_aug`; no prefetcher on the CPU).

    python -m benchmarks.timm_like_loop --data DIR --out OUT --epochs 8

Prints one JSON line per epoch on stdout ({"epoch", "top1", "top5", "train_seconds"}).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import OrderedDict
from pathlib import Path

import torch
from timm import create_model
from timm.data import create_dataset, create_loader
from timm.loss import LabelSmoothingCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import AverageMeter, CheckpointSaver, accuracy, update_summary

LOG_INTERVAL = 50  # train.py's --log-interval default
_logger = logging.getLogger("train")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--smoothing", type=float, default=0.1)
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--mean", type=float, default=0.25)
    parser.add_argument("--std", type=float, default=0.35)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="resnet18")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model = create_model(args.model, num_classes=args.num_classes, in_chans=1)
    loader_args = dict(input_size=(1, args.image_size, args.image_size), batch_size=args.batch_size,
                       mean=(args.mean,), std=(args.std,), num_workers=args.workers, crop_pct=1.0,
                       use_prefetcher=False, device=torch.device("cpu"))
    train_set = create_dataset("", root=args.data, split="train", is_training=True, input_img_mode="L")
    val_set = create_dataset("", root=args.data, split="val", input_img_mode="L")
    train_loader = create_loader(train_set, is_training=True, no_aug=True, **loader_args)
    val_loader = create_loader(val_set, is_training=False, **loader_args)

    optimizer = create_optimizer_v2(model, opt="sgd", lr=args.lr, weight_decay=args.weight_decay, momentum=0.9)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=args.epochs, step_on_epochs=False,
                                       updates_per_epoch=len(train_loader))
    train_loss = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    validate_loss = torch.nn.CrossEntropyLoss()
    saver = CheckpointSaver(model, optimizer, args=args, checkpoint_dir=str(out), recovery_dir=str(out),
                            decreasing=False, max_history=1)

    for epoch in range(args.epochs):
        started = time.perf_counter()
        train_metrics = train_one_epoch(epoch, model, train_loader, optimizer, train_loss, scheduler)
        train_seconds = time.perf_counter() - started
        eval_metrics = validate(model, val_loader, validate_loss)
        scheduler.step(epoch + 1, eval_metrics["top1"])
        update_summary(epoch, train_metrics, eval_metrics, filename=str(out / "summary.csv"),
                       lr=optimizer.param_groups[0]["lr"], write_header=epoch == 0)
        saver.save_checkpoint(epoch, metric=eval_metrics["top1"])
        print(json.dumps({"epoch": epoch, "top1": eval_metrics["top1"], "top5": eval_metrics["top5"],
                          "train_seconds": train_seconds}), flush=True)


def train_one_epoch(epoch, model, loader, optimizer, loss_fn, scheduler) -> OrderedDict:
    losses_m = AverageMeter()
    model.train()
    num_updates = epoch * len(loader)
    for batch_idx, (images, target) in enumerate(loader):
        loss = loss_fn(model(images), target)
        losses_m.update(loss.item(), images.size(0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        num_updates += 1
        scheduler.step_update(num_updates=num_updates, metric=losses_m.avg)
        if batch_idx % LOG_INTERVAL == 0 or batch_idx == len(loader) - 1:
            lr = sum(g["lr"] for g in optimizer.param_groups) / len(optimizer.param_groups)
            _logger.info(f"Train: {epoch} [{batch_idx:>4d}/{len(loader)}]  Loss: {losses_m.val:#.3g} "
                         f"({losses_m.avg:#.3g})  LR: {lr:.3e}")
    return OrderedDict([("loss", losses_m.avg)])


def validate(model, loader, loss_fn) -> OrderedDict:
    losses_m, top1_m, top5_m = AverageMeter(), AverageMeter(), AverageMeter()
    model.eval()
    with torch.no_grad():
        for images, target in loader:
            output = model(images)
            loss = loss_fn(output, target)
            acc1, acc5 = accuracy(output, target, topk=(1, 5))
            losses_m.update(loss.item(), images.size(0))
            top1_m.update(acc1.item(), output.size(0))
            top5_m.update(acc5.item(), output.size(0))
    return OrderedDict([("loss", losses_m.avg), ("top1", top1_m.avg), ("top5", top5_m.avg)])


if __name__ == "__main__":
    main()

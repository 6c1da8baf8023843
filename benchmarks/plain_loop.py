"""The baseline `dist-train bench` measures start-up, memory and throughput against: a plain
webdataset training loop as users write it without a framework (webdataset's pipeline, a
WebLoader with workers, torchvision transforms, a hand-written loop; under torchrun, DDP over
gloo). Same data, model, batch, augmentation and workers as `configs/digits_cpu.yaml`.

    python benchmarks/plain_loop.py --data data/digits --epochs 3
    torchrun --nproc_per_node 2 benchmarks/plain_loop.py --data data/digits --epochs 1

Prints JSON lines on stdout (rank 0): {"event": "first_step", "time": unix seconds} after the
first optimizer step, {"step": N, "images_per_sec": R} every 10 steps (the rate since the
previous line, training only), {"epoch": E, "train_images_per_sec": R} at each epoch's end (from
its start: the workers' start included) and {"epoch": E, "val_acc": A} after its validation.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import webdataset as wds
from torchvision.transforms import v2

from dist_train.recipe.models import SmallCNN

LOG_EVERY = 10


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True, help="a make-shards directory (train-*.tar, val-*.tar)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()

    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.manual_seed(0)

    train_tf = v2.Compose([v2.Resize((16, 16), antialias=True),
                           v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1)),
                           v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.25], [0.35])])
    val_tf = v2.Compose([v2.Resize((16, 16), antialias=True), v2.ToImage(),
                         v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.25], [0.35])])
    train_urls = sorted(glob.glob(f"{args.data}/train-*.tar"))
    val_urls = sorted(glob.glob(f"{args.data}/val-*.tar"))
    manifest = json.loads(Path(args.data, "dataset.json").read_text())
    train_samples = sum(s["samples"] for s in manifest["splits"]["train"]["shards"])
    steps_per_epoch = train_samples // (args.batch_size * world)

    train_set = (wds.WebDataset(train_urls, shardshuffle=len(train_urls), nodesplitter=wds.split_by_node)
                 .shuffle(1000).decode("pill").to_tuple("png", "cls").map_tuple(train_tf, int)
                 .batched(args.batch_size, partial=False))
    train_loader = (wds.WebLoader(train_set, batch_size=None, num_workers=args.workers)
                    .repeat().with_epoch(steps_per_epoch))
    val_set = (wds.WebDataset(val_urls, shardshuffle=False, nodesplitter=wds.split_by_node)
               .decode("pill").to_tuple("png", "cls").map_tuple(val_tf, int).batched(256))
    val_loader = wds.WebLoader(val_set, batch_size=None, num_workers=args.workers)

    model = SmallCNN(10, 1)
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    total = args.epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / steps_per_epoch) * 0.5 * (1 + math.cos(math.pi * s / total)))
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.05)

    step = 0
    for epoch in range(args.epochs):
        model.train()
        window_start, window_images = time.perf_counter(), 0
        epoch_start, epoch_images = window_start, 0
        for images, labels in train_loader:
            optimizer.zero_grad()
            loss = criterion(model(images), labels)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            window_images += len(labels) * world
            epoch_images += len(labels) * world
            if step == 1 and rank == 0:
                print(json.dumps({"event": "first_step", "time": time.time()}), flush=True)
            if step % LOG_EVERY == 0:
                loss.item()  # as a loop that logs its loss waits for it
                now = time.perf_counter()
                if rank == 0:
                    rate = window_images / (now - window_start)
                    print(json.dumps({"step": step, "images_per_sec": rate}), flush=True)
                window_start, window_images = now, 0
        loss.item()
        if rank == 0:
            rate = epoch_images / (time.perf_counter() - epoch_start)
            print(json.dumps({"epoch": epoch, "train_images_per_sec": rate}), flush=True)
        model.eval()
        correct = seen = 0
        with torch.no_grad():
            for images, labels in val_loader:
                correct += (model(images).argmax(1) == labels).sum().item()
                seen += len(labels)
        if distributed:
            counts = torch.tensor([correct, seen])
            dist.all_reduce(counts)
            correct, seen = counts.tolist()
        if rank == 0:
            print(json.dumps({"epoch": epoch, "val_acc": correct / seen}), flush=True)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

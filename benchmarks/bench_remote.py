"""`dist-train bench` figures for remote shards: training (the small CNN, dist-train's train
step) on digits read from nginx on 127.0.0.1, through a shard cache half the training set's
size (so every epoch fetches every shard again), against the same training on the same shards
as local files. Images/s of each, alternating, medians.

  remote_vs_local          cold cache each measure, server at full speed             >= 0.95
  remote_rate_limited      server limited to 1.25x the bytes/s training consumes     >= 0.9
                           (prefetching along the training order hides the latency)

Skipped (reported as NaN, with the reason) where nginx is not installed.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.local_servers import Nginx
from benchmarks.timing import fit_steps, ratio
from dist_train.config import SchedConfig, TrainConfig, load_config
from dist_train.data import workers
from dist_train.data.order import OrderSpec, steps_per_epoch
from dist_train.data.pipeline import TrainStreamSpec, make_train_loader
from dist_train.data.resolve import resolve_shards
from dist_train.recipe.optim import Schedule
from dist_train.runtime.accelerator import make_accelerator

SHARD_SIZE = 64  # small shards: a cache half the data holds every step's shuffle windows
SHUFFLE_BUFFER = 128
RATE_MARGIN = 1.25


def _small_cnn():
    from dist_train.recipe.models import SmallCNN

    model = SmallCNN(10, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def remote_figures(tmp: Path, config: Path, epochs: int, repeats: int, num_workers: int) -> tuple[float, float, str]:
    """(remote / local images/s, rate-limited remote / local, a note: what was measured)."""
    from dist_train.data import sources
    from dist_train.data.shard_writer import make_shards

    data = tmp / "remote-bench" / "digits"
    make_shards(sources.digits(), data, val_fraction=0.2, seed=0, shard_size=SHARD_SIZE)
    try:
        full_speed = Nginx(data.parent)
    except FileNotFoundError as exc:
        return float("nan"), float("nan"), f"skipped: {exc}"
    workers.start_helpers()
    cfg = load_config(config)
    cfg.data.num_workers, cfg.data.shuffle_buffer = num_workers, SHUFFLE_BUFFER
    train_bytes = sum(p.stat().st_size for p in data.glob("train-*.tar"))
    cfg.data.cache_limit = train_bytes // 2
    order = OrderSpec(seed=0, global_batch=cfg.data.batch_size, partitions=1, window=SHUFFLE_BUFFER)

    accelerator = make_accelerator(TrainConfig(cpu=True))

    def started(spec: str, cache_dir: Path | None) -> Callable[[], float]:
        """Training images/s over `epochs` epochs from one loader started once (untimed), as a
        run starts it; a cold cache at the start of each measure."""
        cfg.data.cache_dir = str(cache_dir or tmp / "unused-cache")
        shards = resolve_shards(spec, "train", 10, cache=None)
        spec_ = TrainStreamSpec(shards, order, epoch=0, num_classes=10, batch_size=cfg.data.batch_size,
                                epochs=10**6)
        loader = make_train_loader(spec_, cfg.data)
        steps = steps_per_epoch(shards.samples, order.global_batch)
        torch.manual_seed(0)
        model, optimizer = accelerator.prepare(*_small_cnn())
        schedule = Schedule(optimizer, SchedConfig(name="cosine"), steps, 10**6)
        next_epoch = itertools.count()

        def measure() -> float:
            if cache_dir is not None:  # cold: no copies left from the last measure
                cache_dir.mkdir(parents=True, exist_ok=True)
                for copy in cache_dir.glob("*.tar"):
                    copy.unlink()
            start = time.perf_counter()
            for _ in range(epochs):
                loader.set_position(next(next_epoch))
                batches = iter(loader)
                fit_steps(model, batches, steps, optimizer, schedule, accelerator)
                assert next(batches, None) is None  # the epoch's end: the loader's iteration ends
            return epochs * steps * order.global_batch / (time.perf_counter() - start)

        measure()
        return measure


    try:
        local = started(str(data), None)
        local_rate = statistics.median(local() for _ in range(2))
        remote = started(f"{full_speed.url}/digits", tmp / "cache-full-speed")
        vs_local = ratio(remote, local, repeats, warmup=False)
        consumed = local_rate * train_bytes / sum(1 for _ in data.glob("train-*.tar")) / SHARD_SIZE
        limited_server = Nginx(data.parent, rate=int(RATE_MARGIN * consumed))
        try:
            limited = started(f"{limited_server.url}/digits", tmp / "cache-limited")
            vs_limited = ratio(limited, local, repeats, warmup=False)
        finally:
            limited_server.close()
    finally:
        full_speed.close()
    note = (f"{num_workers} worker(s), digits in shards of {SHARD_SIZE}, cache {train_bytes // 2} bytes "
            f"(half the training set), rate limit {int(RATE_MARGIN * consumed)} bytes/s per connection")
    return vs_local, vs_limited, note

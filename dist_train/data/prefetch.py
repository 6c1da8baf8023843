"""What a node reads when, and a thread that fetches remote shards ahead of that.

The training order (data/order.py) is a pure function of (seed, epoch, step), so a node can
compute, before it starts, at which steps its ranks read each shard: `NodePlan`. A step
reads, in each partition its ranks cover, the shuffle windows its positions fall in, and a
window's samples are a contiguous run of the partition: so the plan is a few intervals of
steps per shard, computed per window (thousands for ImageNet), never per sample.

`Prefetcher` (a thread of the node's first training process) walks the plan from the step
the run has reached: it fetches each shard before it is needed, as long as the cache has room
or holds a copy this epoch no longer needs (which it evicts). A copy needed again later, such
as a shard at a partition boundary (read by one rank at the epoch's start and another at its
end), is kept: so each shard is downloaded once per node per epoch. Readers fetch what is not
there yet themselves, evicting by Belady's rule (the copy needed last goes first; exact here,
because the future is known), so a slow network costs time, never correctness.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections import defaultdict

from dist_train.data.order import EpochOrder
from dist_train.data.shard_cache import NEVER, RemoteObject, ShardCache
from dist_train.errors import ConfigError, DataError

RETRY_S = 0.01  # a prefetcher that found the cache full tries again after the run moves on, this often at most

# Ranks of a node advance in step with each other to within one optimizer step: a copy the
# prefetcher's process last needed this many steps ago may still be read by another rank.
LAG_STEPS = 2


def steps_in_flight(num_workers: int, grad_accum_steps: int) -> int:
    """Steps whose shards a node's readers may be reading at once: per rank, each worker builds
    one micro-batch and has two queued (the loader's prefetch) ahead of the step the training
    process consumes; ranks are at most one step apart. A reader keeps the copies of this many
    steps behind its own from eviction, and the cache must hold them all (`check_room`)."""
    micro_batches = max(num_workers, 1) * 3
    return -(-micro_batches // grad_accum_steps) + LAG_STEPS + 1


class NodePlan:
    """For one epoch: the steps at which the node's ranks read each shard."""

    def __init__(self, order: EpochOrder, ranks: range, grad_accum_steps: int, batch_size: int,
                 cache: ShardCache):
        self.epoch = order.epoch
        self.steps = order.steps
        # The next epoch's plan, its steps counted on from this epoch's end (`then_follow`).
        self.then: NodePlan | None = None
        self._intervals: dict[str, list[tuple[int, int]]] = defaultdict(list)
        self._objects: dict[str, RemoteObject] = {}
        per_step, window = order.per_partition_step, order.spec.window
        chunk = grad_accum_steps * batch_size
        partitions = sorted({p for r in ranks for p in order.partitions_of(r, chunk)})
        for p in partitions:
            for w in range(math.ceil(order.partition_len / window)):
                lo = w * window
                hi = min(lo + window, order.partition_len)
                steps = (lo // per_step, (hi - 1) // per_step)
                first = p * order.partition_len + lo
                for i in range(bisect.bisect_right(order.starts, first) - 1, len(order.shards)):
                    if order.starts[i] >= p * order.partition_len + hi:
                        break
                    self._add(order.shards[i], steps, cache)
        for url, spans in self._intervals.items():
            self._intervals[url] = _merged(spans)
        self._name_to_url = {cache.path(url).name: url for url in self._intervals}

    def _add(self, shard, steps: tuple[int, int], cache: ShardCache) -> None:
        self._intervals[shard.url].append(steps)
        self._objects[shard.url] = RemoteObject(shard.url, shard.bytes, shard.sha256)

    def then_follow(self, next_epoch: NodePlan) -> NodePlan:
        """Chain the next epoch's plan on, so that its first shards are fetched before this
        epoch ends (no wait at the epoch's start)."""
        self.then = next_epoch
        self._name_to_url = {**next_epoch._name_to_url, **self._name_to_url}
        return self

    def next_use(self, url: str, now: float) -> float:
        """The first step at or after `now` that reads this shard (NEVER: none this epoch, nor
        in the next one if it is chained on)."""
        for first, last in self._intervals.get(url, ()):
            if last >= now:
                return max(first, now)
        if self.then is not None:
            return self.steps + self.then.next_use(url, max(now - self.steps, 0))
        return NEVER

    def next_use_by_name(self, now: float, lag: int = LAG_STEPS):
        """`next_use` for the cache, which knows copies by file name: a copy read within `lag`
        steps before `now` counts as needed now (a slower process of the node may read it)."""
        def next_use(name: str) -> float:
            url = self._name_to_url.get(name)
            return NEVER if url is None else max(self.next_use(url, now - lag), now)
        return next_use

    def schedule(self, now: int) -> list[tuple[int, RemoteObject]]:
        """(step first needed, shard) of every shard still to be read from `now`, soonest first."""
        upcoming = []
        for url, obj in {**(self.then._objects if self.then else {}), **self._objects}.items():
            when = self.next_use(url, now)
            if when != NEVER:
                upcoming.append((int(when), obj))
        upcoming.sort(key=lambda item: item[0])
        return upcoming

    def peak_bytes(self, span: int) -> tuple[int, int]:
        """(most bytes of shards read within any `span` consecutive steps, the first such step)."""
        events: dict[int, list[str]] = defaultdict(list)
        for url, spans in self._intervals.items():
            for first, _ in spans:
                events[first].append(url)
        peak, at = 0, 0
        for start in sorted(events):
            total = sum(self._objects[u].bytes for u, spans in self._intervals.items()
                        if any(first <= start + span - 1 and last >= start for first, last in spans))
            if total > peak:
                peak, at = total, start
        return peak, at


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Intervals of steps, sorted, with those that overlap or touch joined."""
    merged: list[tuple[int, int]] = []
    for first, last in sorted(spans):
        if merged and merged[-1][1] + 1 >= first:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return merged


def check_room(plan: NodePlan, cache: ShardCache, span: int) -> None:
    """Refuse a cache limit that cannot hold what the node reads within `span` steps (and the
    step before them, which a reader keeps)."""
    peak, step = plan.peak_bytes(span + 1)
    if peak > cache.limit:
        raise ConfigError(
            f"data.cache_limit ({cache.limit} bytes) cannot hold the shards this node reads within "
            f"{span} steps from step {step} of epoch {plan.epoch} ({peak} bytes): raise it, or use "
            "smaller shards or a smaller data.shuffle_buffer")


class Prefetcher:
    """Fetches the shards of the current epoch's plan ahead of the step the run has reached."""

    def __init__(self, cache: ShardCache, horizon: int):
        self.cache = cache
        # Steps ahead it fetches: enough to hide a download's latency, few enough that the copies
        # it holds leave room for what else uses the cache (validation between epochs).
        self.horizon = horizon
        self._plan: NodePlan | None = None
        self._now = 0
        self._changed = threading.Condition()
        self._stopped = False
        self.error: DataError | None = None
        self._thread = threading.Thread(target=self._run, name="dist-train-prefetch", daemon=True)
        self._thread.start()

    def follow(self, plan: NodePlan, now: int) -> None:
        with self._changed:
            self._plan, self._now = plan, now
            self._changed.notify()

    def reached(self, step: int) -> None:
        if step != self._now:
            with self._changed:
                self._now = step
                self._changed.notify()

    def stop(self) -> None:
        with self._changed:
            self._stopped = True
            self._changed.notify()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            with self._changed:
                if self._stopped:
                    return
                plan, now = self._plan, self._now
            outcome, started = "done", time.monotonic()
            if plan is not None and self.error is None:
                try:
                    outcome = self._fetch_ahead(plan, now)
                except DataError as exc:  # readers meet it themselves and stop the run
                    self.error = exc
            with self._changed:
                if outcome == "done":  # all this epoch reads from here on is here: wait for the next plan
                    self._changed.wait_for(lambda plan=plan: self._stopped or self._plan is not plan)
                elif outcome in ("full", "ahead"):  # room, or the next shard's turn, comes as the run moves on
                    self._changed.wait_for(lambda plan=plan, now=now: self._stopped or self._plan is not plan
                                           or self._now != now)
            if outcome == "full":
                # Not more often than this: each try scans the cache, in the training process.
                time.sleep(max(0.0, RETRY_S - (time.monotonic() - started)))

    def _fetch_ahead(self, plan: NodePlan, now: int) -> str:
        """Fetch in order of need: "done" (all here), "ahead" (all needed within the horizon
        here), "full" (no room without evicting a copy still needed), or "moved" (the run
        moved on meanwhile)."""
        for when, obj in plan.schedule(now):
            if self._stopped or self._now != now or self._plan is not plan:
                return "moved"
            if when > now + self.horizon:
                return "ahead"
            if not self.cache.fetch(obj, plan.next_use_by_name(now), needed_at=when, keep_needed=True):
                return "full"
        return "done"

"""`dist-train bench`: what the framework costs and how it scales, each figure a ratio measured
side by side in the same run (alternating repeats, medians), printed with its target.

    dist-train bench                     # about 10 minutes on 2 CPU cores
    dist-train bench --quick --json b.json   # seconds per figure: a smoke test (CI)
    dist-train bench --only ddp_scaling,loop_overhead   # those figures alone (a bisect's)

Figures (targets for 2 CPU cores):
  loop_overhead          dist-train's train step / a hand-written PyTorch loop     >= 0.97
  loader_vs_decode       shard loader (best worker count) / decoding in one loop   >= 0.9
  loader_vs_imagefolder  shard loader / torchvision ImageFolder, same files        >= 1.0
                         (both loaders started, untimed, as a run starts them once;
                         printed beside them: a new shard loader's first batch, in ms)
  ddp_scaling            2-process CPU DDP / 1 process, 1 thread each              >= 1.7
                         (printed beside it: the same 2 processes without DDP / 1 process,
                         what this machine allows; and the same DDP / 1 process launched
                         normally, torch's threads on every core: what a second process
                         gains a user)
  no_sync_gain           step time, K=8 accumulation with no_sync / syncing each   <  1.0
  time_to_acc            seconds from command start to val acc >= 0.97 (digits,     <= 60
                         10 epochs, tracking off)
  time_to_acc_shipped    the same with configs/digits_cpu.yaml as users run it       <= 30
                         (15-epoch schedule, wandb and plots on)
  peak_rss_mb            peak resident memory of any process of the digits run     <= 1500
  startup_vs_plain       seconds from command start to the first optimizer step,   <= 1.4
                         `dist-train train` (configs/digits_cpu.yaml as shipped) / a
                         plain webdataset loop's (benchmarks/plain_loop.py), median
                         of alternating rounds (printed beside it: both, `startup_s`
                         and `plain_startup_s`)
  ddp_startup_vs_plain   the same under 2-process CPU DDP: `accelerate launch`       <= 1.4
                         (launch/cpu-ddp.yaml) / the plain loop under torchrun
  tree_pss_vs_plain      peak PSS summed over the whole process tree while training  <= 1.2
                         (workers, helpers and wandb's service included) / the plain
                         loop's, the same workers (beside it: both, in MB)
  throughput_vs_plain    steady training images/s (whole epochs after the first) /  >= 1.1
                         the plain loop's, the same runs (bench_versus.py: these four
                         are measured before this process imports torch)
  index_build_s          the training index of 1.28M samples (synthetic shards, no   <= 5.0
                         images): built on the node and held by 2 DataLoader workers
                         (benchmarks/bench_index.py; --quick: 128k samples)
  index_worker_mb        what a worker holds of its own, plus its share of the       <= 50
                         mapped index, after looking up spans all over it
  compile_speedup        train step with the model torch.compile'd / eager          >= 1.0
                         (train.compile; printed beside it: the compile's seconds)
  fsdp_state_vs_ddp      one process's parameter + gradient + optimizer-state bytes  <= 0.55
                         under 2-process FSDP / under DDP, a ViT-S/16 with AdamW, from
                         the tensors its optimizer step holds (benchmarks/bench_fsdp.py)
  activation_memory_ratio  peak memory a forward + backward of a ViT-Ti/16 at 224 px,  <= 0.5
                         batch 32, adds with model.grad_checkpointing / without
  whole_run_vs_timm      whole-process wall time of an 8-epoch, 1-process run / that  <= 0.9
                         of a loop doing per epoch what timm's train.py does (timm
                         resnet18, 5,000 28 px images; benchmarks/bench_whole_run.py:
                         median of 5 alternating rounds, the phases of our run beside it)
  remote_vs_local        the shard loader from nginx (loopback), cold cache / local  >= 0.95
  remote_rate_limited    the same, nginx limited to 1.25x the loader's bytes/s       >= 0.9
                         (benchmarks/bench_remote.py)
On a CUDA machine it also prints the input pipeline's images/s over the model's alone
(benchmarks/gpu_check.py: ResNet-50 bf16 channels_last, 224 px JPEG shards; target >= 0.95),
with JPEG decoded by the workers and on the GPU (data.decode_on_device).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_fsdp import activation_memory_ratio, fsdp_state_vs_ddp
from benchmarks.bench_index import index_figures
from benchmarks.bench_remote import remote_figures
from benchmarks.bench_versus import LAUNCH, REPO, REPO_CONFIG, kill_tree, process_tree
from benchmarks.bench_versus import measure as measure_versus_plain_loop
from benchmarks.bench_whole_run import measure as measure_whole_run
from benchmarks.targets import TARGETS, VERSUS_FIGURES, figures_wanted
from benchmarks.timing import fit_steps, ratio
from dist_train import atomic_file

GPU_CHECK = REPO / "benchmarks" / "gpu_check.py"


@dataclass(frozen=True)
class Sizes:
    repeats: int
    steps: int  # optimizer steps per timed repeat
    loader_epochs: int
    ddp_steps: int  # optimizer steps per timed epoch of a ddp_scaling launch
    accum_steps: int  # optimizer steps (of K=8 micro-steps) per timed epoch of no_sync_gain
    train_epochs: int
    remote_epochs: int  # training epochs per measure of the remote figures (0.7 s each)
    remote_repeats: int  # their alternating repeats: at this size they move +-3% with 4
    index_samples: int  # of the synthetic dataset of the index figures


FULL = Sizes(repeats=8, steps=30, loader_epochs=3, ddp_steps=40, accum_steps=15, train_epochs=10,
             remote_epochs=4, remote_repeats=8, index_samples=1_280_000)
QUICK = Sizes(repeats=2, steps=4, loader_epochs=1, ddp_steps=6, accum_steps=1, train_epochs=3,
              remote_epochs=1, remote_repeats=1, index_samples=128_000)


def main(argv: list[str] | None = None, versus: dict[str, float] | None = None) -> int:
    """`versus`: the figures against the plain loop, measured before this process imported
    torch (`dist-train bench` does, bench_versus.py says why); None: measured here."""
    parser = argparse.ArgumentParser(prog="dist-train bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that every figure runs")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--only", help="these figures alone, comma-separated (a bisect's one figure)")
    parser.add_argument("--worker", choices=["ddp", "accum"], help=argparse.SUPPRESS)  # inside accelerate launch
    parser.add_argument("--steps", type=int, default=20, help=argparse.SUPPRESS)
    parser.add_argument("--all-threads", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _launched_worker(args.worker, args.steps, one_thread=not args.all_threads)
    sizes = QUICK if args.quick else FULL
    try:
        wanted = figures_wanted(args.only)
    except ValueError as exc:
        parser.error(str(exc))
    figures: dict[str, float] = {}
    details: dict[str, object] = {}
    if wanted & set(VERSUS_FIGURES):
        details |= versus or measure_versus_plain_loop(args.quick)
        figures["startup_vs_plain"] = details["startup_s"] / details["plain_startup_s"]
        figures["ddp_startup_vs_plain"] = details["ddp_startup_s"] / details["plain_ddp_startup_s"]
        figures["tree_pss_vs_plain"] = details["tree_pss_mb"] / details["plain_tree_pss_mb"]
        figures["throughput_vs_plain"] = details["images_per_sec"] / details["plain_images_per_sec"]
    if "whole_run_vs_timm" in wanted:
        details |= measure_whole_run(args.quick)
        figures["whole_run_vs_timm"] = details.pop("whole_run_vs_timm")
    with tempfile.TemporaryDirectory() as tmp:
        shards = _digits_shards(Path(tmp))
        # The launched (multi-process) figures first: nothing of this process (DataLoader
        # workers, threads) may compete with them for the 2 cores.
        if "ddp_scaling" in wanted:
            figures["ddp_scaling"], details["ddp_ceiling"], details["ddp_vs_normal"] = ddp_scaling(sizes)
        if "no_sync_gain" in wanted:
            figures["no_sync_gain"] = no_sync_gain(sizes)
        if "fsdp_state_vs_ddp" in wanted:
            figures["fsdp_state_vs_ddp"], details["fsdp_bytes"] = fsdp_state_vs_ddp(args.quick)
        if "activation_memory_ratio" in wanted:
            figures["activation_memory_ratio"], details["activation_peak_mib"] = activation_memory_ratio(args.quick)
        if wanted & {"time_to_acc", "peak_rss_mb"}:
            figures["time_to_acc"], figures["peak_rss_mb"] = digits_run(shards, Path(tmp), sizes)
        if "time_to_acc_shipped" in wanted:
            figures["time_to_acc_shipped"] = shipped_time_to_acc(shards, Path(tmp))
        if wanted & {"index_build_s", "index_worker_mb"}:
            details |= index_figures(Path(tmp), sizes.index_samples)
            figures["index_build_s"], figures["index_worker_mb"] = details["index_build_s"], details["index_worker_mb"]
        if "loop_overhead" in wanted:
            figures["loop_overhead"] = loop_overhead(sizes)
        if "compile_speedup" in wanted:
            figures["compile_speedup"], details["compile_seconds"] = compile_speedup(sizes)
        if "progressive_speedup" in wanted:
            figures["progressive_speedup"], details["progressive"] = progressive_speedup(sizes)
        if wanted & {"loader_vs_decode", "loader_vs_imagefolder", "remote_vs_local", "remote_rate_limited"}:
            (figures["loader_vs_decode"], figures["loader_vs_imagefolder"], details["best_workers"],
             details["loader_first_batch_ms"]) = loaders(shards, Path(tmp), sizes)
        if wanted & {"remote_vs_local", "remote_rate_limited"}:
            figures["remote_vs_local"], figures["remote_rate_limited"], details["remote"] = remote_figures(
                Path(tmp), REPO_CONFIG, sizes.remote_epochs, sizes.remote_repeats, details["best_workers"])
    if wanted == set(TARGETS):
        details["gpu"] = gpu_figures(args.quick) if torch.cuda.is_available() else "pending (no GPU here)"
    figures = {name: figures[name] for name in TARGETS if name in figures}  # table order
    report = {**figures, **details, "machine": _machine(), "quick": args.quick}
    _print_table(figures, details)
    if args.json:
        atomic_file.write_text(args.json, json.dumps(report, indent=2) + "\n")
    return 0


# --- loop_overhead --------------------------------------------------------------------------


def loop_overhead(sizes: Sizes) -> float:
    """Images/s of dist-train's training step (`fit_steps`) over a plain loop: same model,
    data, batch."""
    from dist_train.config import SchedConfig, TrainConfig
    from dist_train.recipe.models import SmallCNN
    from dist_train.recipe.optim import Schedule
    from dist_train.runtime.accelerator import make_accelerator

    torch.set_num_threads(1)  # steadier timings; the same for both sides
    accelerator = make_accelerator(TrainConfig(cpu=True))
    batches = _digit_batches(64, sizes.steps)

    def plain() -> float:
        model, optimizer = _fresh_model(SmallCNN)
        criterion = torch.nn.CrossEntropyLoss()
        start = time.perf_counter()
        model.train()
        for images, labels in batches:
            optimizer.zero_grad()
            loss = criterion(model(images), labels)
            loss.backward()
            optimizer.step()
        return len(batches) * 64 / (time.perf_counter() - start)

    def ours() -> float:
        model, optimizer = _fresh_model(SmallCNN)
        model, optimizer = accelerator.prepare(model, optimizer)
        schedule = Schedule(optimizer, SchedConfig(name="cosine"), len(batches), 1)
        start = time.perf_counter()
        fit_steps(model, batches, len(batches), optimizer, schedule, accelerator)
        return len(batches) * 64 / (time.perf_counter() - start)

    return ratio(ours, plain, sizes.repeats)


def compile_speedup(sizes: Sizes) -> tuple[float, float]:
    """(images/s of the training step with the model compiled as `train.compile` does it,
    after accelerate's wrap, over the same step eager; seconds the first compiled step took)."""
    from dist_train.config import SchedConfig, TrainConfig
    from dist_train.recipe.models import SmallCNN
    from dist_train.recipe.optim import Schedule
    from dist_train.runtime.accelerator import make_accelerator

    torch.set_num_threads(1)  # as loop_overhead: steadier, the same for both sides
    accelerator = make_accelerator(TrainConfig(cpu=True))
    batches = _digit_batches(64, sizes.steps)

    def prepared(compiled: bool) -> tuple:
        model, optimizer = accelerator.prepare(*_fresh_model(SmallCNN))
        model = torch.compile(model) if compiled else model  # what TorchDynamoPlugin does last in prepare()
        return model, optimizer, Schedule(optimizer, SchedConfig(name="constant"), len(batches), 1)

    compiled = prepared(compiled=True)
    model, optimizer, schedule = compiled
    start = time.perf_counter()
    fit_steps(model, batches[:1], 1, optimizer, schedule, accelerator)  # the compile
    compile_seconds = time.perf_counter() - start

    def rate(parts: Callable[[], tuple]) -> Callable[[], float]:
        def measure() -> float:
            model, optimizer, schedule = parts()
            start = time.perf_counter()
            fit_steps(model, batches, len(batches), optimizer, schedule, accelerator)
            return len(batches) * 64 / (time.perf_counter() - start)
        return measure

    # The compiled model is reused (compiling again would be timed); eager starts fresh each time.
    return ratio(rate(lambda: compiled), rate(lambda: prepared(compiled=False)), sizes.repeats), compile_seconds


# FFCV's ResNet-50 schedule (88 epochs: 160 px to epoch 65, ramped to 192 by epoch 76, in steps
# of 32), at half the sides so that the CPU takes seconds: 80 -> 96 px in steps of 16.
PROGRESSIVE = {"start": 80, "end": 96, "start_epoch": 65, "end_epoch": 76, "step": 16, "epochs": 88}


def progressive_speedup(sizes: Sizes) -> tuple[float, str]:
    """(seconds of a run at the final size throughout over the seconds of the same run with
    progressive resizing, the schedule's images/s at each size). The product's step
    (`fit_steps`) of a torchvision ResNet-18, batch 32, all of torch's threads, timed at each
    size of the schedule in alternating rounds; the run's time is the sum over sizes of its
    steps at that size over their rate (the schedule's steps per size: data/resolution.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # what a user's run has
    try:
        return _progressive_speedup(sizes)
    finally:
        torch.set_num_threads(threads)  # the figures after this one keep theirs


def _progressive_speedup(sizes: Sizes) -> tuple[float, str]:
    from dist_train.config import DataConfig, SchedConfig, TrainConfig
    from dist_train.data.resolution import resolution_schedule
    from dist_train.recipe.models import create_model
    from dist_train.recipe.optim import Schedule
    from dist_train.runtime.accelerator import make_accelerator

    accelerator = make_accelerator(TrainConfig(cpu=True))
    cfg = DataConfig(image_size=PROGRESSIVE["end"], progressive_start_size=PROGRESSIVE["start"],
                     progressive_start_epoch=PROGRESSIVE["start_epoch"], progressive_end_epoch=PROGRESSIVE["end_epoch"],
                     progressive_step=PROGRESSIVE["step"])
    steps_at = resolution_schedule(cfg, PROGRESSIVE["epochs"]).steps_per_size(100, PROGRESSIVE["epochs"])
    steps = max(2, sizes.steps // 3)
    generator = torch.Generator().manual_seed(0)
    batches = {size: [(torch.randn(32, 3, size, size, generator=generator), torch.randint(0, 10, (32,)))] * steps
               for size in steps_at}

    def rate(size: int) -> float:
        model, optimizer = accelerator.prepare(*_fresh_model(lambda classes, _: create_model("resnet18", classes)))
        sched = Schedule(optimizer, SchedConfig(name="constant"), steps, 1)
        fit_steps(model, batches[size][:1], 1, optimizer, sched, accelerator)  # warm-up
        start = time.perf_counter()
        fit_steps(model, batches[size], steps, optimizer, sched, accelerator)
        return steps * 32 / (time.perf_counter() - start)

    rates: dict[int, list[float]] = {size: [] for size in steps_at}
    for i in range(max(2, sizes.repeats // 2)):
        for size in (sorted(rates) if i % 2 == 0 else sorted(rates, reverse=True)):
            rates[size].append(rate(size))
    median = {size: statistics.median(values) for size, values in rates.items()}
    total = sum(steps_at.values())
    progressive = sum(count / median[size] for size, count in steps_at.items())
    throughout = total / median[PROGRESSIVE["end"]]
    shown = ", ".join(f"{size} px {median[size]:.0f} img/s for {steps_at[size] / total:.0%} of the steps"
                      for size in sorted(median))
    return throughout / progressive, f"{shown} (FFCV's 160 -> 192 px, halved)"


# --- loaders --------------------------------------------------------------------------------


def loaders(shards: Path, tmp: Path, sizes: Sizes) -> tuple[float, float, int, float]:
    """(shard loader / decode bound, shard loader / ImageFolder, best worker count, a new
    loader's first batch in ms)."""
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    from dist_train.config import load_config
    from dist_train.data import workers
    from dist_train.data.order import EpochOrder, OrderSpec
    from dist_train.data.pipeline import SampleDecoder, TrainStreamSpec, make_train_loader
    from dist_train.data.random_access import ShardReader
    from dist_train.data.resolve import resolve_shards
    from dist_train.data.transforms import build_batch_normalize, build_transform

    # As `dist-train train` does first: the fork server that DataLoader workers start from is
    # started once per run, not per loader (dist_train/data/workers.py).
    workers.start_helpers()
    cfg = load_config(REPO_CONFIG)
    train = resolve_shards(str(shards), "train", 10)
    order = OrderSpec(seed=0, global_batch=cfg.data.batch_size, partitions=1, window=cfg.data.shuffle_buffer)
    reader = ShardReader()
    epoch_order = EpochOrder(train.shards, order, 0)
    positions = range(epoch_order.steps * order.global_batch)
    raw = [reader.sample(*epoch_order.sample(q)) for q in positions]
    reader.close()
    decode = SampleDecoder(cfg.data, train=True, num_classes=10)

    def decode_bound() -> float:
        start, size = time.perf_counter(), cfg.data.batch_size
        for first in range(0, len(raw), size):
            decode.collate([decode(sample) for sample in raw[first:first + size]])
        return len(raw) / (time.perf_counter() - start)

    def new_shard_loader(workers: int):
        cfg.data.num_workers = workers
        return make_train_loader(TrainStreamSpec(train, order, epoch=0, num_classes=10,
                                                 batch_size=cfg.data.batch_size), cfg.data)

    def started_shard_loader(workers: int) -> Callable[[], float]:
        """A measure of images/s over `sizes.loader_epochs` epochs of one loader, used as a run
        uses it: started once, untimed (its workers live across epochs), each measure going
        on with the next epochs. A new loader's start is timed apart (`first_batch_ms`)."""
        loader = new_shard_loader(workers)
        epochs = itertools.count()

        def measure() -> float:
            start, n = time.perf_counter(), 0
            for _ in range(sizes.loader_epochs):
                loader.set_position(next(epochs))
                for _, labels in loader:
                    n += len(labels)
            return n / (time.perf_counter() - start)

        measure()
        return measure

    def first_batch_ms(workers: int) -> float:
        start = time.perf_counter()
        next(iter(new_shard_loader(workers)))
        return (time.perf_counter() - start) * 1000

    worker_counts = [0, 2] if sizes is QUICK else [0, 1, 2]
    started = {w: started_shard_loader(w) for w in worker_counts}
    best = max(worker_counts, key=lambda w: statistics.median(started[w]() for _ in range(2)))
    shard_loader = started.pop(best)
    started.clear()  # the other loaders' workers end
    start_ms = statistics.median(first_batch_ms(max(best, 1)) for _ in range(3))
    vs_decode = ratio(shard_loader, decode_bound, max(2, sizes.repeats // 2))

    folder = tmp / "imagefolder"
    for i, sample in enumerate(raw):
        path = folder / sample["cls"].decode() / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(sample["png"])
    # The usual recipe: the whole transform, normalization included, on each sample.
    transform = v2.Compose([build_transform(cfg.data, train=True), build_batch_normalize(cfg.data)])
    dataset = ImageFolder(str(folder), transform=transform, loader=lambda p: _open_gray(p))
    folder_loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.data.batch_size, shuffle=True,
                                                num_workers=best, drop_last=True, persistent_workers=best > 0)

    def image_folder() -> float:  # started by _ratio's untimed first run, as the shard loader was
        start, n = time.perf_counter(), 0
        for _ in range(sizes.loader_epochs):
            for _, labels in folder_loader:
                n += len(labels)
        return n / (time.perf_counter() - start)

    vs_folder = ratio(shard_loader, image_folder, max(2, sizes.repeats // 2))
    return vs_decode, vs_folder, best, start_ms


# --- ddp_scaling and no_sync_gain (real accelerate launch) ------------------------------------


def ddp_scaling(sizes: Sizes) -> tuple[float, float, float]:
    """(2-process DDP / 1 process of 1 thread, the same 2 processes without DDP / 1 process
    of 1 thread, 2-process DDP / 1 normal process).

    The second is this machine's ceiling for the first: the two processes train the same epochs
    on their own, without communicating, inside the same launches (interleaved with the DDP
    epochs), so what the machine gives a second process is measured beside what DDP makes of it.
    The third is what a user gains from a second process: the 1-process run is launched as a
    user launches it, with torch's threads on every core, not held to one.
    """
    two, apart, single, normal = [], [], [], []

    def two_processes() -> float:
        result = _launch("cpu-ddp.yaml", "ddp", sizes.ddp_steps)
        apart.append(result["apart_images_per_sec"])
        two.append(result["images_per_sec"])
        return two[-1]

    def one_process() -> float:
        single.append(_launch("cpu.yaml", "ddp", sizes.ddp_steps)["images_per_sec"])
        normal.append(_launch("cpu.yaml", "ddp", sizes.ddp_steps, one_thread=False)["images_per_sec"])
        return single[-1]

    # Each launch warms up inside the worker; no extra untimed launches. (--quick: one pair, a
    # check that the figure runs, at 7 s a launch.)
    scaling = ratio(two_processes, one_process, sizes.repeats // 2, warmup=False)
    return (scaling, statistics.median(apart) / statistics.median(single),
            statistics.median(two) / statistics.median(normal))


def no_sync_gain(sizes: Sizes) -> float:
    result = _launch("cpu-ddp.yaml", "accum", sizes.accum_steps)
    return result["no_sync_step_s"] / result["sync_each_step_s"]


def _launch(config: str, worker: str, steps: int, one_thread: bool = True) -> dict:
    """Run `_launched_worker` under accelerate launch; `one_thread`: each process held to one
    thread (else as a plain launch leaves it: torch's threads on every core, for one process)."""
    port = str(29600 + os.getpid() % 300)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(LAUNCH / config),
           "--main_process_port", port, "-m", "benchmarks.bench", "--worker", worker, "--steps", str(steps)]
    cmd += [] if one_thread else ["--all-threads"]
    env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if one_thread else {}),
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])


def _launched_worker(kind: str, steps: int, one_thread: bool = True) -> int:
    from dist_train.config import SchedConfig, TrainConfig
    from dist_train.recipe.models import SmallCNN
    from dist_train.recipe.optim import Schedule
    from dist_train.runtime.accelerator import make_accelerator

    if one_thread:
        torch.set_num_threads(1)
    accum = 8 if kind == "accum" else 1
    accelerator = make_accelerator(TrainConfig(cpu=True, grad_accum_steps=accum))
    batch = 64 if kind == "ddp" else 16
    width = 32 if kind == "ddp" else 128  # accum: more parameters, so the all-reduce matters
    batches = _digit_batches(batch, steps * accum, seed=accelerator.process_index)
    model, optimizer = _fresh_model(lambda n, c: SmallCNN(n, c, width=width))
    model, optimizer = accelerator.prepare(model, optimizer)
    schedule = Schedule(optimizer, SchedConfig(name="constant"), steps, 1)

    def timed_epoch(model, optimizer, schedule) -> float:
        accelerator.wait_for_everyone()
        start = time.perf_counter()
        fit_steps(model, batches, steps, optimizer, schedule, accelerator, accum, log_every_steps=10**9)
        accelerator.wait_for_everyone()  # an epoch of several processes ends with the slowest
        return time.perf_counter() - start

    timed_epoch(model, optimizer, schedule)  # warm-up: allocations, DDP bucket rebuild
    if kind == "ddp":
        epochs = {"ddp": lambda: timed_epoch(model, optimizer, schedule)}
        if accelerator.num_processes > 1:
            # Interleaved with the DDP epochs, each process also trains a model of its own, not
            # wrapped in DDP, on the same batches: no communication at all, so the rate the
            # machine itself allows these processes together.
            own_model, own_optimizer = _fresh_model(lambda n, c: SmallCNN(n, c, width=width))
            own_schedule = Schedule(own_optimizer, SchedConfig(name="constant"), steps, 1)
            epochs["apart"] = lambda: timed_epoch(own_model, own_optimizer, own_schedule)
            epochs["apart"]()  # warm-up
        seconds: dict[str, list[float]] = {name: [] for name in epochs}
        for _ in range(3):
            for name, epoch in epochs.items():
                seconds[name].append(epoch())
        images = len(batches) * batch * accelerator.num_processes
        rates = {name: images / statistics.median(times) for name, times in seconds.items()}
        result = {"images_per_sec": rates["ddp"], "apart_images_per_sec": rates.get("apart", rates["ddp"])}
    else:
        flags = accelerator.gradient_state.plugin_kwargs
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(3):
            for sync_each in (False, True):
                flags["sync_each_batch"] = sync_each
                times[sync_each].append(timed_epoch(model, optimizer, schedule) / steps)
        result = {"no_sync_step_s": statistics.median(times[False]),
                  "sync_each_step_s": statistics.median(times[True])}
    if accelerator.is_main_process:
        print(json.dumps(result), flush=True)
    accelerator.wait_for_everyone()
    return 0


# --- time_to_acc and peak_rss_mb: the digits run itself ------------------------------------------


def digits_run(shards: Path, tmp: Path, sizes: Sizes) -> tuple[float, float]:
    out = tmp / "run"
    cmd = [sys.executable, "-m", "dist_train", "train", "--config", str(REPO_CONFIG), f"data.train={shards}",
           f"data.val={shards}", f"train.output_dir={out}", f"train.epochs={sizes.train_epochs}",
           "train.progress_bar=false", "tracking.wandb=false", "tracking.plots=false"]
    start = time.perf_counter()
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    reached, peak_kb = float("nan"), 0
    while process.poll() is None:
        peak_kb = max(peak_kb, _peak_rss_kb(process.pid))
        if reached != reached and _val_accuracy(out) >= 0.97:  # still nan: not reached yet
            reached = time.perf_counter() - start
        time.sleep(0.05)
    if process.returncode != 0:
        raise RuntimeError(f"digits run failed:\n{process.stderr.read()[-3000:]}")
    if reached != reached and _val_accuracy(out) >= 0.97:
        reached = time.perf_counter() - start
    return reached, peak_kb / 1024


def shipped_time_to_acc(shards: Path, tmp: Path) -> float:
    """Seconds from command start to val accuracy >= 0.97 with configs/digits_cpu.yaml as
    shipped (its 15-epoch schedule, wandb and plots on; only the data and run directory
    given), as a user runs it; the run is stopped once there."""
    out = tmp / "shipped"
    cmd = [sys.executable, "-m", "dist_train", "train", "--config", str(REPO_CONFIG), f"data.train={shards}",
           f"data.val={shards}", f"train.output_dir={out}"]
    with tempfile.TemporaryFile("w+") as errors:
        start = time.perf_counter()
        process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errors, text=True, start_new_session=True)
        try:
            while process.poll() is None:
                if _val_accuracy(out) >= 0.97:
                    return time.perf_counter() - start
                time.sleep(0.05)
        finally:
            kill_tree(process)
        if process.returncode != 0:
            errors.seek(0)
            raise RuntimeError(f"digits run failed:\n{errors.read()[-3000:]}")
    return time.perf_counter() - start if _val_accuracy(out) >= 0.97 else float("nan")


def _val_accuracy(run: Path) -> float:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return 0.0
    accs = [json.loads(line).get("val/acc", 0.0) for line in path.read_text().splitlines() if line.strip()]
    return max(accs, default=0.0)


def _peak_rss_kb(pid: int) -> int:
    """The largest VmHWM (peak resident set) among a process and its descendants (Linux)."""
    peak = 0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        except OSError:
            continue
    return peak


# --- on a GPU: the input pipeline against the model alone (benchmarks/gpu_check.py) ----------


def gpu_figures(quick: bool) -> dict[str, float]:
    """ResNet-50 bf16 channels_last on 224 px JPEG shards: the pipeline's images/s over the
    model's alone, with JPEG decoded by the workers and on the GPU (data.decode_on_device)."""
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in (("cpu_decode", []), ("gpu_decode", ["--decode-on-device"])):
            out = Path(tmp) / f"{name}.json"
            sizes = ["--steps", "3", "--warmup", "2"] if quick else []
            subprocess.run([sys.executable, str(GPU_CHECK), "--channels-last", "--data", str(Path(tmp) / "shards"),
                            "--json", str(out), *sizes, *extra], check=True, capture_output=True, timeout=1200)
            result = json.loads(out.read_text())
            figures[f"{name}_ratio"] = round(result["pipeline_over_model"], 3)
            figures[f"{name}_images_per_sec"] = round(result["pipeline_images_per_sec"])
        figures["model_images_per_sec"] = round(result["model_images_per_sec"])
    return figures


# --- helpers ------------------------------------------------------------------------------


def _digits_shards(tmp: Path) -> Path:
    from dist_train.data import sources
    from dist_train.data.shard_writer import make_shards

    out = tmp / "digits"
    make_shards(sources.digits(), out, val_fraction=0.2, seed=0, shard_size=256)
    return out


def _digit_batches(batch: int, count: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = torch.tensor(digits.images[:, None] / 16.0, dtype=torch.float32)
    images = torch.nn.functional.interpolate(pixels, size=16, mode="bilinear")
    labels = torch.tensor(digits.target)
    order = np.random.default_rng(seed).permutation(len(labels))
    picks = [order[(i * batch) % (len(labels) - batch):][:batch] for i in range(count)]
    return [(images[p].contiguous(), labels[p].contiguous()) for p in picks]


def _fresh_model(build):
    torch.manual_seed(0)
    model = build(10, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def _open_gray(path: str):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("L")


def _machine() -> dict[str, object]:
    import accelerate
    import torchvision
    import webdataset

    return {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "accelerate": accelerate.__version__,
        "webdataset": webdataset.__version__,
    }


def _print_table(figures: dict[str, float], details: dict[str, object]) -> None:
    print(f"{'figure':24s} {'value':>10s}  {'target':>10s}  met")
    for name, value in figures.items():
        target = TARGETS[name]
        verdict = "yes" if target.met(value) else "NO"
        print(f"{name:24s} {value:10.3f}  {target.op + ' ' + str(target.value):>10s}  {verdict}")
    d = details
    notes = {  # what is printed beside the figures, for those measured (--only)
        "best_workers": lambda: f"loader figures with {d['best_workers']} DataLoader worker(s), the best of those "
                                f"tried, loaders started before timing: a new one's first batch comes after "
                                f"{d['loader_first_batch_ms']:.0f} ms",
        "ddp_ceiling": lambda: f"ddp_scaling: 2 processes that do not communicate reach {d['ddp_ceiling']:.3f} here, "
                               f"and DDP against 1 process with torch's threads on every core is "
                               f"{d['ddp_vs_normal']:.3f}",
        "compile_seconds": lambda: f"compile_speedup: the compile took {d['compile_seconds']:.1f} s",
        "progressive": lambda: f"progressive_speedup: {d['progressive']}",
        "startup_s": lambda: f"start-up {d['startup_s']:.2f} s, the plain loop's {d['plain_startup_s']:.2f} s "
                             f"(2-process DDP: {d['ddp_startup_s']:.2f} s and {d['plain_ddp_startup_s']:.2f} s); "
                             f"tree PSS {d['tree_pss_mb']:.0f} MB, the plain loop's {d['plain_tree_pss_mb']:.0f} MB; "
                             f"{d['images_per_sec']:.0f} images/s, the plain loop {d['plain_images_per_sec']:.0f}",
        "index_samples": lambda: f"index of {d['index_samples']} samples: built in {d['index_build_only_s']:.2f} s, "
                                 f"a {d['index_file_mb']:.0f} MB file",
        "fsdp_bytes": lambda: f"fsdp_state_vs_ddp: {_mib(d['fsdp_bytes']['fsdp'])} under FSDP, "
                              f"{_mib(d['fsdp_bytes']['ddp'])} under DDP",
        "activation_peak_mib": lambda: f"activation_memory_ratio: {d['activation_peak_mib']['with']:.0f} MiB with "
                                       f"checkpointing, {d['activation_peak_mib']['without']:.0f} MiB without",
        "whole_run_s": lambda: f"whole runs: {d['whole_run_s']['dist_train']:.1f} s, the timm-like loop "
                               f"{d['whole_run_s']['timm_like']:.1f} s (rounds {d['whole_run_rounds']}; best accuracy "
                               f"{d['whole_run_best_acc']}; our phases, medians: {d['whole_run_phases_s']})",
        "remote": lambda: f"remote figures: {d['remote']}",
        "gpu": lambda: f"GPU, pipeline / model alone: {d['gpu']}",
    }
    print(f"({'; '.join(note() for key, note in notes.items() if key in d)})")


def _mib(held: dict[str, int]) -> str:
    """Parameters + gradients + optimizer state, in MiB."""
    return " + ".join(f"{held[k] / 2**20:.1f}" for k in ("params", "grads", "optimizer_state")) + " MiB"


if __name__ == "__main__":
    raise SystemExit(main())

"""data.sampling on a 1:50 imbalanced subset of digits: class frequencies, a pure function of
(seed, epoch), the same batches on any number of processes and workers and after a resume;
loss.class_weights; and, trained, better recall of the rare classes than uniform sampling.
(A 2-process run with balanced sampling, killed with SIGKILL and resumed, ends bitwise like
one never stopped: the recipe runs of test_resume.py and test_remote_shards.py sample.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dist_train.config import DataConfig, LossConfig, load_config
from dist_train.data.datasets import resolve_datasets, train_class_counts
from dist_train.data.labels import LabelReader
from dist_train.data.order import EpochOrder, OrderSpec
from dist_train.data.pipeline import TrainStreamSpec, make_train_loader
from dist_train.data.resolve import resolve_shards
from dist_train.data.sampling import class_weights, epoch_sampler, read_labels
from dist_train.data.shard_format import ShardSet
from dist_train.errors import ConfigError, DataError
from dist_train.recipe.losses import WeightedCrossEntropy, auto_class_weights, build_loss

from .conftest import DIGITS_CONFIG, RARE_DIGITS, REPO

RARE = RARE_DIGITS  # the conftest's `imbalanced_digits` keeps 1 training image in 50 of these


def _config(data: Path, *overrides: str):
    return load_config(DIGITS_CONFIG, [f"data.train={data}", f"data.val={data}", *overrides])


def _setup(data: Path, *overrides: str):
    cfg = _config(data, *overrides)
    datasets = resolve_datasets(cfg.data)
    labels = read_labels(datasets.train.shards, LabelReader(10))
    sampler = epoch_sampler(cfg.data, datasets.train, 10) if cfg.data.sampling != "uniform" else None
    return cfg, datasets, labels, sampler


def _epoch_labels(datasets, labels: np.ndarray, sampler, spec: OrderSpec, epoch: int) -> Counter:
    order = EpochOrder(datasets.train.shards, spec, epoch, sampler)
    firsts = dict(zip((s.url for s in datasets.train.shards),
                      np.cumsum([0] + [s.samples for s in datasets.train.shards]), strict=False))
    read = [order.sample(q) for q in range(order.steps * spec.global_batch)]
    return Counter(int(labels[firsts[shard.url] + index]) for shard, index in read)


def test_class_counts_are_in_the_manifest_and_the_index(imbalanced_digits, tmp_path):
    cfg, datasets, labels, _ = _setup(imbalanced_digits)
    counts = datasets.train.class_counts
    assert counts == tuple(np.bincount(labels, minlength=10)) and sum(counts) == datasets.train.samples
    assert max(counts[:5]) / min(counts[5:]) >= 47 and min(counts[:5]) / max(counts[5:]) <= 50
    # Shards without a manifest: counted by indexing, the same counts.
    plain = tmp_path / "plain"
    plain.mkdir()
    for shard in datasets.train.shards:
        (plain / Path(shard.url).name).symlink_to(shard.url)
    assert resolve_shards(str(plain), "train", 10).class_counts == counts
    assert train_class_counts(cfg.data, datasets) == counts


def test_balanced_sampling_reads_every_class_within_10_percent_of_uniform(imbalanced_digits):
    _, datasets, labels, sampler = _setup(imbalanced_digits, "data.sampling=balanced")
    spec = OrderSpec(0, 32, 1, 100, sampling="balanced")
    for epoch in range(3):
        seen = _epoch_labels(datasets, labels, sampler, spec, epoch)
        total = sum(seen.values())
        assert total == datasets.train.samples // 32 * 32  # an epoch as long as the training set
        assert all(abs(seen[c] / total - 0.1) <= 0.01 for c in range(10)), (epoch, sorted(seen.items()))
    uniform = _epoch_labels(datasets, labels, None, OrderSpec(0, 32, 1, 100), 0)
    assert max(uniform[c] for c in RARE) <= 3  # what the run reads without sampling


def test_sqrt_and_weights_sampling_follow_their_weights(imbalanced_digits):
    _, datasets, labels, sampler = _setup(imbalanced_digits, "data.sampling=sqrt", "data.samples_per_epoch=20000")
    counts = np.bincount(labels, minlength=10)
    seen = _epoch_labels(datasets, labels, sampler, OrderSpec(0, 32, 2, 100, "sqrt", 20000), 0)
    expected = np.sqrt(counts) / np.sqrt(counts).sum()
    assert np.allclose([seen[c] / sum(seen.values()) for c in range(10)], expected, atol=0.01)
    per_class = [1.0] * 5 + [0.0] * 4 + [10.0]
    assert class_weights("weights", counts, per_class).tolist() == per_class
    _, _, _, sampler = _setup(imbalanced_digits, "data.sampling=weights", f"data.sampling_weights={per_class}")
    seen = _epoch_labels(datasets, labels, sampler, OrderSpec(0, 32, 1, 100, "weights"), 0)
    assert all(seen[c] == 0 for c in range(5, 9)) and seen[9] > 0


def test_the_draw_is_a_pure_function_of_seed_and_epoch(imbalanced_digits):
    _, datasets, _, sampler = _setup(imbalanced_digits, "data.sampling=balanced")
    spec = OrderSpec(3, 32, 2, 50, sampling="balanced")
    first = [EpochOrder(datasets.train.shards, spec, 1, sampler).sample(q) for q in range(600)]
    assert first == [EpochOrder(datasets.train.shards, spec, 1, sampler).sample(q) for q in range(600)]
    assert first != [EpochOrder(datasets.train.shards, spec, 2, sampler).sample(q) for q in range(600)]


def _batches(datasets, sampler, workers: int, world=1, rank=0, accum=1, start_step=0):
    cfg = DataConfig(num_workers=workers, image_size=8, channels=1, mean=[0.3], std=[0.3], augment="light")
    spec = TrainStreamSpec(ShardSet(datasets.train.shards, None), OrderSpec(0, 32, 2, 100, sampling="balanced"),
                           epoch=1, num_classes=10, batch_size=32 // (world * accum), grad_accum_steps=accum,
                           rank=rank, world_size=world, start_step=start_step, sampler=sampler)
    return list(make_train_loader(spec, cfg))


def test_sampled_batches_are_the_same_on_one_and_two_processes_any_workers_and_resumed(imbalanced_digits):
    """The real pipeline: one process reads each global batch that two ranks (with 1 worker
    each, accumulating 2 micro-batches) read together, bitwise, and a resume at step 7 reads
    the same steps on."""
    _, datasets, _, sampler = _setup(imbalanced_digits, "data.sampling=balanced")
    whole = _batches(datasets, sampler, workers=0)
    assert len(whole) == datasets.train.samples // 32
    halves = [_batches(datasets, sampler, workers=1, world=2, rank=r, accum=2) for r in range(2)]
    for step, (x, y) in enumerate(whole):
        parts = [halves[r][2 * step + m] for r in range(2) for m in range(2)]
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
    resumed = _batches(datasets, sampler, workers=2, start_step=7)
    for (x, y), (x2, y2) in zip(whole[7:], resumed, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    rare_read = sum(int(torch.isin(y, torch.tensor(list(RARE))).sum()) for _, y in whole)
    assert abs(rare_read / (len(whole) * 32) - 0.5) < 0.05  # half the reads from the five rare classes


def test_sampling_settings_are_checked(imbalanced_digits):
    with pytest.raises(ConfigError, match=r"data.samples_per_epoch sets the length of a sampled epoch"):
        _config(imbalanced_digits, "data.samples_per_epoch=100")
    with pytest.raises(ConfigError, match=r"data.sampling=weights takes its weights from data.sampling_weights"):
        _config(imbalanced_digits, "data.sampling=weights")
    with pytest.raises(ConfigError, match=r"data.sampling_weights has 3 values; the dataset has 10 classes"):
        resolve_datasets(_config(imbalanced_digits, "data.sampling=weights", "data.sampling_weights=[1, 2, 3]").data)
    with pytest.raises(ConfigError, match="draws by class, which needs one label per image"):
        _config(imbalanced_digits, "data.sampling=balanced", "data.task=multilabel", "loss.name=bce",
                "train.monitor=val/map_macro")
    cfg = _config(imbalanced_digits, "data.sampling=weights", f"data.sampling_weights={[0.0] * 5 + [1.0] * 5}")
    datasets = resolve_datasets(cfg.data)
    epoch_sampler(cfg.data, datasets.train, 10)  # rare classes only: fine
    cfg.data.sampling_weights = [0.0] * 10 + [1.0]
    with pytest.raises(DataError, match="every training sample has weight 0"):
        epoch_sampler(cfg.data, datasets.train, 11)


def test_class_weighted_cross_entropy_accumulates_like_one_batch():
    """Each sample's loss times its class's weight, averaged over samples: two micro-batches
    average to the whole batch's loss (nn.CrossEntropyLoss(weight=...) divides by the summed
    weights of each micro-batch instead, and does not)."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 4, generator=generator)
    target = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3, 0, 0, 3])
    weight = [0.5, 1.0, 2.0, 4.0]
    for smoothing in (0.0, 0.1):
        loss = WeightedCrossEntropy(weight, smoothing)
        halves = (loss(logits[:6], target[:6]) + loss(logits[6:], target[6:])) / 2
        assert torch.allclose(halves, loss(logits, target), atol=1e-6)
        reference = nn.CrossEntropyLoss(weight=torch.tensor(weight), label_smoothing=smoothing, reduction="none")
        assert torch.allclose(loss(logits, target), reference(logits, target).mean(), atol=1e-6)
    soft = torch.softmax(torch.randn(12, 4, generator=generator), dim=1)  # mixup's targets
    expected = -(soft * torch.tensor(weight) * logits.log_softmax(1)).sum(1).mean()
    assert torch.allclose(WeightedCrossEntropy(weight)(logits, soft), expected, atol=1e-6)


def test_class_weights_auto_are_sklearns_balanced_weights(imbalanced_digits):
    from sklearn.utils.class_weight import compute_class_weight

    cfg, datasets, labels, _ = _setup(imbalanced_digits, "loss.class_weights=auto")
    expected = compute_class_weight("balanced", classes=np.arange(10), y=labels)
    assert np.allclose(auto_class_weights(train_class_counts(cfg.data, datasets)), expected)
    loss = build_loss(cfg.loss, 10, lambda: train_class_counts(cfg.data, datasets))
    assert torch.allclose(loss.weight, torch.tensor(expected, dtype=torch.float32))
    with pytest.raises(ConfigError, match=r"loss.class_weights has 2 values; the dataset has 10 classes"):
        build_loss(LossConfig(class_weights=[1.0, 2.0]), 10)
    with pytest.raises(ConfigError, match=r"loss.class_weights is for cross_entropy and label_smoothing"):
        _config(imbalanced_digits, "loss.name=focal", "loss.class_weights=auto")


def _rare_recall(run: Path) -> float:
    confusion = np.asarray(json.loads((run / "last" / "meta.json").read_text())["confusion_matrix"])
    return float(np.mean([confusion[c, c] / confusion[c].sum() for c in RARE]))


# Three seeds of one sampling mode in one process (fit() after fit(): one interpreter start-up).
THREE_SEEDS = """
import sys
from dist_train.config import load_config
from dist_train.training.engine import fit

config, data, mode, out = sys.argv[1:]
for seed in (0, 1, 2):
    fit(load_config(config, [f"data.train={data}", f"data.val={data}", f"data.sampling={mode}",
                             "data.num_workers=0", "train.epochs=5", f"train.seed={seed}",
                             f"train.output_dir={out}-{seed}", "train.progress_bar=false",
                             "tracking.wandb=false", "tracking.plots=false"]))
"""


@pytest.mark.slow
def test_balanced_sampling_lifts_the_recall_of_rare_classes(imbalanced_digits, tmp_path):
    """3 seeds x (uniform, balanced), 5 epochs of the digits config on the 1:50 set, the two
    modes side by side: the mean validation recall of the five rare classes, printed (RESULTS.md)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on two cores
    processes = [subprocess.Popen([sys.executable, "-c", THREE_SEEDS, str(DIGITS_CONFIG), str(imbalanced_digits),
                                   mode, str(tmp_path / mode)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True) for mode in ("uniform", "balanced")]
    for process in processes:
        assert process.wait(timeout=300) == 0, process.stderr.read()[-3000:]
    recall = {(mode, seed): _rare_recall(tmp_path / f"{mode}-{seed}")
              for mode in ("uniform", "balanced") for seed in (0, 1, 2)}
    for mode in ("uniform", "balanced"):
        values = [recall[mode, seed] for seed in (0, 1, 2)]
        print(f"\nrare-class recall, {mode:8s}: seeds 0-2 {' '.join(f'{v:.3f}' for v in values)}, "
              f"mean {np.mean(values):.3f}")
    for seed in (0, 1, 2):
        assert recall["balanced", seed] >= recall["uniform", seed] + 0.3, recall


def test_a_sampled_epoch_too_long_to_draw_is_one_line_before_training(digits_dir, tmp_path):
    """10**12 samples an epoch would be a numpy MemoryError in every process; a hundred times the
    training set is the most a sampled epoch may draw."""
    from dist_train.training.engine import fit

    cfg = load_config(DIGITS_CONFIG, [f"data.train={digits_dir}", f"data.val={digits_dir}", "data.sampling=balanced",
                                      "data.samples_per_epoch=1000000000000", f"train.output_dir={tmp_path / 'run'}",
                                      "tracking.wandb=false", "data.num_workers=0"])
    with pytest.raises(ConfigError, match=r"^data\.samples_per_epoch=1,000,000,000,000 is more than 143,800 \(100 x "
                                          r"the training set's 1,438 samples, at most 20,000,000\)$"):
        fit(cfg)

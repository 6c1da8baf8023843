"""The datasets of a run: its train and val shard sets, resolved from the config and checked."""


from __future__ import annotations

from dataclasses import dataclass

from dist_train.config import DataConfig
from dist_train.data.labels import LabelReader, class_counts, label_reader
from dist_train.data.remote import is_remote
from dist_train.data.resolve import resolve_shards
from dist_train.data.shard_cache import ShardCache, cache_for
from dist_train.data.shard_format import MANIFEST_NAME, Damage, ShardSet
from dist_train.errors import ConfigError, DataError


@dataclass(frozen=True)
class Datasets:
    train: ShardSet
    val: ShardSet
    num_classes: int
    class_names: list[str]

    @property
    def damage(self) -> tuple[Damage, ...]:
        """What data.on_error=skip left out while indexing, train then val."""
        return self.train.damage + self.val.damage

    @property
    def skipped_samples(self) -> int:
        return self.train.skipped_samples + self.val.skipped_samples


def cache_if_remote(specs: list[str | list[str]], cfg: DataConfig) -> ShardCache | None:
    """The node's shard cache if any of these data specs names remote shards."""
    flat = [one for spec in specs for one in (spec if isinstance(spec, list) else [spec])]
    return cache_for(cfg) if any(isinstance(one, str) and is_remote(one) for one in flat) else None


def check_task(shards: ShardSet, task: str, key: str) -> None:
    """A dataset.json that says its labels are of another task than the run's is refused."""
    if shards.task and shards.task != task:
        raise DataError(f"{key}: a {shards.task} dataset (its {MANIFEST_NAME} says so), and data.task is {task}; "
                        f"set data.task={shards.task}")


def resolve_datasets(cfg: DataConfig) -> Datasets:
    """Find and check the train and val shards; settle the number and names of classes."""
    skip = cfg.on_error == "skip"
    cache = cache_if_remote([cfg.train, cfg.val], cfg)
    labels = label_reader(cfg, cfg.num_classes)
    train = resolve_shards(cfg.train, "train", cfg.num_classes, skip_damaged=skip, cache=cache, labels=labels)
    val = resolve_shards(cfg.val, "val", cfg.num_classes, skip_damaged=skip, cache=cache, labels=labels)
    check_task(train, cfg.task, "data.train")
    check_task(val, cfg.task, "data.val")

    manifest_names = train.class_names or val.class_names
    num_classes = cfg.num_classes or (len(manifest_names) if manifest_names else 0)
    if not num_classes:
        raise ConfigError("data.num_classes is required for shards without a dataset.json")
    if manifest_names and len(manifest_names) > num_classes:
        raise DataError(
            f"the dataset has {len(manifest_names)} classes but data.num_classes is {num_classes}"
        )
    names = cfg.class_names or manifest_names or [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise ConfigError(f"data.class_names has {len(names)} names; data.num_classes is {num_classes}")
    if cfg.sampling_weights is not None and len(cfg.sampling_weights) != num_classes:
        raise ConfigError(f"data.sampling_weights has {len(cfg.sampling_weights)} values; the dataset has "
                          f"{num_classes} classes")
    if train.samples == 0 or val.samples == 0:
        raise DataError(f"empty split: train has {train.samples} samples, val {val.samples}")
    datasets = Datasets(train, val, num_classes, list(names))
    if datasets.skipped_samples > cfg.max_skipped:
        first = next(d for d in datasets.damage if d.samples)
        raise DataError(f"{datasets.skipped_samples} damaged samples, more than data.max_skipped="
                        f"{cfg.max_skipped}; the first: {first.where}: {first.problem}")
    return datasets


def train_class_counts(cfg: DataConfig, datasets: Datasets) -> tuple[int, ...]:
    """Training samples per class (single-label data): from the manifest or indexing, else read
    from the shards' labels."""
    counts = datasets.train.class_counts
    if counts is None:
        from dist_train.data.sampling import read_labels

        cache = cache_if_remote([cfg.train], cfg)
        counts = class_counts(read_labels(datasets.train.shards, LabelReader(datasets.num_classes), cache).tolist(),
                              datasets.num_classes)
    return tuple(counts) + (0,) * (datasets.num_classes - len(counts))

"""The shard format, in one place: what `make-shards` writes and every reader reads.

A dataset directory holds webdataset tar shards and `dataset.json` (the manifest: class
names, the task, and per split its shards with their sample counts, samples per class, sizes
and sha256, and optionally the file of every sample's byte span). Each sample of a shard is
one image member (`IMAGE_EXTENSIONS`) and one label member (`LABEL_MEMBERS`): the label as
decimal text in `.cls` (`3`; multi-label `3,7`), or a JSON list in `.json`. Shards from other
tools follow the same member names without a manifest. `Shard` and `ShardSet` are a split as
a run knows it, once resolved and checked (data/resolve.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from dist_train.data import remote
from dist_train.data.labels import LABEL_MEMBERS, summed_counts
from dist_train.data.shard_cache import RemoteObject

MANIFEST_NAME = "dataset.json"
MANIFEST_VERSION = 2  # 2: class_counts per shard and split, and the task (and, optional, spans)
SPANS_SUFFIX = ".spans.npy"  # <split>.spans.npy: every sample's byte span (data/sample_index.py)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # an image member's name; its bytes decide the decoder
# The formats a dataset's images may have: a member's name does not choose its decoder (a
# ".png" member that is a TIFF, PCX or SGI file would be read by that decoder), this list does.
# A JPEG named .png, as real datasets hold, still decodes.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
__all__ = ["IMAGE_EXTENSIONS", "IMAGE_FORMATS", "LABEL_MEMBERS", "MANIFEST_NAME", "MANIFEST_VERSION",
           "SPANS_SUFFIX", "Damage", "Shard", "ShardSet"]


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int  # usable samples: those the run reads
    # With data.on_error=skip: keys of damaged samples left out, and whether the file ends
    # early (only the samples before the damage are read). Readers index the shard the same
    # way (`usable_index`), so sample i means the same sample everywhere.
    exclude: frozenset[str] = frozenset()
    truncated: bool = False
    # Remote shards: the object's size and, from a manifest, its sha256 (checked on download).
    bytes: int = -1
    sha256: str = ""
    # Samples per class (multi-label: per label), from a manifest or from indexing; () unknown.
    class_counts: tuple[int, ...] = ()
    # Local shards of a manifest: the file of its split's sample spans (make-shards writes it)
    # and this shard's first row there (data/sample_index.py); "" where none was written.
    spans_file: str = ""
    spans_row: int = 0

    @property
    def remote(self) -> bool:
        return remote.is_remote(self.url)

    def as_remote_object(self) -> RemoteObject:
        return RemoteObject(self.url, self.bytes, self.sha256)

    @property
    def damaged(self) -> bool:
        return bool(self.exclude) or self.truncated


@dataclass(frozen=True)
class Damage:
    """What data.on_error=skip left out: `samples` lost and why. `rest_unknown`: a shard cut
    short with no manifest to say how many samples followed the damage (not in `samples`)."""

    where: str
    problem: str
    samples: int
    rest_unknown: bool = False


@dataclass(frozen=True)
class ShardSet:
    shards: tuple[Shard, ...]
    class_names: list[str] | None  # from a manifest, when there is one
    damage: tuple[Damage, ...] = ()  # found while indexing, with data.on_error=skip
    task: str | None = None  # "multiclass" or "multilabel", from a manifest that says

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def class_counts(self) -> tuple[int, ...] | None:
        """Samples per class over all shards; None when a shard's are unknown (an older manifest)."""
        if any(not s.class_counts for s in self.shards if s.samples):
            return None
        return summed_counts([s.class_counts for s in self.shards])

    @property
    def skipped_samples(self) -> int:
        return sum(d.samples for d in self.damage)

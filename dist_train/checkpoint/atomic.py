"""The one way checkpoints reach the disk, and the one way they are checked.

A checkpoint directory is written in full under a hidden temporary name (`.NAME.tmp`), every
file fsynced and hashed, and only then renamed into place. A previous version with the same
name is moved aside (`.NAME.old`) first and deleted after, so a crash at any moment leaves
one complete version: `resolve_dir` finds it. A directory with its final name is complete.

Each checkpoint keeps the SHA-256 of its files in its own JSON index (`meta.json` or
`state.json`); `check_files` compares them before anything is loaded, so a truncated or
altered file is refused instead of read.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError

from dist_train.errors import CheckpointError


class AtomicDirectory:
    """Write `final` as `.final.tmp`, then `commit()` renames it into place.

        target = AtomicDirectory(run / "best")
        with target.writing():
            tmp = target.create()
            ... write files into tmp ...
            target.commit()
    """

    def __init__(self, final: str | Path):
        self.final = Path(final)
        self.tmp = self.final.with_name(f".{self.final.name}.tmp")
        self.old = self.final.with_name(f".{self.final.name}.old")

    def create(self) -> Path:
        """An empty temporary directory (a leftover of an interrupted write is dropped)."""
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        return self.tmp

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """A full disk or a read-only directory while writing: drop the partial copy and say so
        in one line. Nothing has touched `final` yet, so the previous version stands."""
        try:
            yield
        except (OSError, SafetensorError) as exc:  # safetensors reports I/O errors as its own
            shutil.rmtree(self.tmp, ignore_errors=True)
            intact = " (the previous one there is intact)" if self.final.exists() else ""
            reason = getattr(exc, "strerror", None) or str(exc)
            raise CheckpointError(f"could not write checkpoint {self.final}: {reason}{intact}") from None

    def commit(self) -> Path:
        """fsync every file, then swap the directory into place with renames only (which need
        no disk space: the swap itself cannot run out of it)."""
        for path in self.tmp.iterdir():
            fsync_path(path)
        if self.final.exists():
            shutil.rmtree(self.old, ignore_errors=True)
            os.replace(self.final, self.old)
        os.replace(self.tmp, self.final)
        fsync_path(self.final.parent)
        shutil.rmtree(self.old, ignore_errors=True)
        return self.final


def resolve_dir(directory: str | Path, index_name: str) -> Path:
    """The checkpoint directory, or the previous version if a save was cut off mid-swap."""
    final = Path(directory)
    if (final / index_name).is_file():
        return final
    old = AtomicDirectory(final).old
    if (old / index_name).is_file():
        return old
    raise CheckpointError(f"no checkpoint at {final} (no {index_name})")


def file_hashes(directory: Path, names: list[str]) -> dict[str, str]:
    return {name: sha256_file(directory / name) for name in names}


def check_files(directory: Path, expected: dict[str, str], index_name: str) -> None:
    """Every file named in a checkpoint's index exists and has the SHA-256 recorded there."""
    for name, digest in expected.items():
        file = directory / name
        if not file.is_file() or sha256_file(file) != digest:
            raise CheckpointError(f"{file}: missing, truncated or altered (contents do not match {index_name})")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

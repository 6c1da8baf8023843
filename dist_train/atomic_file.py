"""Output files written whole or not at all: predictions, reports, plots, configs, figures.

Each is written under a hidden temporary name beside its final one and renamed over it only
once complete (a rename within a directory is atomic). A failure halfway, a bad image, a full
disk, Ctrl-C, leaves the previous file as it was and no partial one. (Checkpoints, which must
also survive a power cut, have their own writer with fsync and hashes: checkpoint/atomic.py.)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path`, on failure it goes."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text)

"""The node-local directories dist-train writes into (the shard cache, the training index):
created private, and refused when another user could have planted or can change them.

A default directory has a predictable name in the shared temporary directory
(`/tmp/dist-train-shards-<uid>`): another local user could create it first, or plant a symlink
there that points the cache's evictions at any folder the victim can write. So it is created
with mode 0700, and used only when it is a real directory (not a symlink), owned by this user
and writable by no one else. A directory the user names (`data.cache_dir`,
`DIST_TRAIN_INDEX_DIR`) is theirs to choose: it is created if missing and must be a writable
directory.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from dist_train.errors import DataError


def private_temp_dir(prefix: str, setting: str) -> Path:
    """`<temporary directory>/<prefix>-<uid>`, checked as the module docstring says; `setting`
    names what a user sets to choose another (for the error message)."""
    path = Path(tempfile.gettempdir()) / f"{prefix}-{os.getuid()}"
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise DataError(f"{path}: cannot create it ({exc.strerror}); set {setting} to a writable directory") from None
    info = os.lstat(path)
    problem = ("is a symlink" if stat.S_ISLNK(info.st_mode) else "is not a directory" if not stat.S_ISDIR(info.st_mode)
               else f"belongs to uid {info.st_uid}, not this user ({os.getuid()})" if info.st_uid != os.getuid()
               else f"is writable by other users (mode {stat.S_IMODE(info.st_mode):o})" if info.st_mode & 0o022
               else "")
    if problem:
        raise DataError(f"{path} {problem}: another user may have made it; remove it or set {setting}")
    return path


def usable_dir(path: str | Path, setting: str) -> Path:
    """A directory the user chose, created if missing; one line when it cannot be written."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise DataError(f"{setting}: {path} is not a directory") from None
    except OSError as exc:
        raise DataError(f"{setting}: {path}: cannot create it ({exc.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise DataError(f"{setting}: {path} is not writable by this user")
    return path

"""Seeds derived on purpose: every random draw of the data order, augmentation and mixing is
seeded by a function of (seed, epoch, position, ...), never by a process's global random
state, so that it is the same on any number of processes and workers and after a resume."""

from __future__ import annotations

import hashlib


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (seed, epoch, position...), well mixed and cheap
    (about a microsecond: it is computed for every training sample)."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1

"""Hostile tar shards: the header index never hangs, and fails only with the project's DataError.

A shard from the internet must not be able to stall a job: every header has to move the
reader strictly forward inside the file. The crafted cases are the ones found by probing;
the fuzz mutates a real shard thousands of times, each case under a time bound.
"""

from __future__ import annotations

import contextlib
import io
import random
import signal
import tarfile
from pathlib import Path

import pytest

from dist_train.data.labels import LabelReader
from dist_train.data.resolve import scan_shard
from dist_train.data.tar_index import TAR_BLOCK, index_tar
from dist_train.errors import DataError

CASE_SECONDS = 2.0
FUZZ_CASES = 5000


class TookTooLong(Exception):
    pass


def _alarm(signum, frame):
    raise TookTooLong


@pytest.fixture(scope="module")
def samples(digits_dir) -> list[tuple[str, bytes, bytes]]:
    """(key, png, cls) of six real digits, from the dataset make-shards wrote."""
    path = str(next(digits_dir.glob("val-*.tar")))
    found = []
    with open(path, "rb") as f:
        for key, members in index_tar(path)[:6]:
            found.append((key, *(_read(f, *members[ext]) for ext in ("png", "cls"))))
    return found


def _read(f, offset: int, size: int) -> bytes:
    f.seek(offset)
    return f.read(size)


def shard(samples, pax: bytes | None = None) -> bytearray:
    """A tar of the samples, as webdataset writes them; `pax`: records of a pax header first."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, png, cls in samples:
            for ext, data in (("png", png), ("cls", cls)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = bytearray(out.getvalue())
    if pax is not None:
        header = bytearray(tarfile.TarInfo("pax").tobuf(format=tarfile.USTAR_FORMAT))
        header[156:157] = b"x"
        header[124:136] = f"{len(pax):011o}\0".encode()
        _fix_checksum(header, 0)
        data = header + pax.ljust(-(-len(pax) // TAR_BLOCK) * TAR_BLOCK, b"\0") + data
    return data


def pax_record(key: str, value: str) -> bytes:
    """`<length> key=value\n`, the length counting its own digits."""
    body = f" {key}={value}\n".encode()
    length = len(body)
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return str(length).encode() + body


def _fix_checksum(data: bytearray, at: int) -> None:
    block = data[at:at + TAR_BLOCK]
    total = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
    data[at + 148:at + 156] = f"{total:06o}\0 ".encode()


def _headers(data: bytes) -> list[int]:
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
        return [member.offset for member in tar]


def _bounded(path: Path, num_classes: int = 10) -> None:
    """Index and scan the shard as a run does; DataError is the only way to fail, and fast."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
    try:
        with contextlib.suppress(DataError):
            index_tar(str(path))
        scan_shard(str(path), LabelReader(num_classes))  # data.on_error=skip: never raises, counts the damage
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def crafted(samples, case: str) -> bytearray:
    data = shard(samples)
    second = _headers(data)[2]  # the second sample's first member
    if case == "negative size":
        data[second + 124:second + 136] = b"-0000001000\0"
        _fix_checksum(data, second)
    elif case == "zeroed block inside":
        data[second:second + TAR_BLOCK] = bytes(TAR_BLOCK)
    elif case == "pax record of length 0":
        data = shard(samples, pax=b"0 path=x\n")
    elif case == "pax record of negative length":
        data = shard(samples, pax=b"-9 path=x\n")
    elif case == "pax size negative":
        data = shard(samples, pax=b"13 size=-512\n")
    return data


CRAFTED = {
    "negative size": r"negative member size at byte 2048",
    "zeroed block inside": r"a zeroed block at byte 2048, with data after it",
    "pax record of length 0": r"malformed header at byte 0",
    "pax record of negative length": r"malformed header at byte 0",
    "pax size negative": r"negative member size at byte 1024 \(pax header\)",
}


@pytest.mark.parametrize("case", CRAFTED)
def test_a_crafted_header_is_one_line_naming_shard_and_byte(samples, tmp_path, case):
    path = tmp_path / "crafted.tar"
    path.write_bytes(crafted(samples, case))
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
    try:
        with pytest.raises(DataError, match=rf"crafted\.tar: unreadable tar shard \({CRAFTED[case]}\)"):
            index_tar(str(path))
        usable, damage = scan_shard(str(path), LabelReader(10), expected=6)  # data.on_error=skip
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    read = 1 if case in ("negative size", "zeroed block inside") else 0  # the samples before it
    assert usable.samples == read and usable.truncated
    assert sum(d.samples for d in damage) == 6 - read  # the rest, counted


def mutate(data: bytearray, headers: list[int], rng: random.Random) -> bytearray:
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        at = rng.choice(headers)
        kind = rng.random()
        if kind < 0.3:  # the size field: digits, signs, huge, garbage
            value = rng.choice([b"-0000001000", b"77777777777", b"00000000000", b"0000000000x",
                                f"{rng.randrange(1 << 33):011o}".encode(),
                                bytes(rng.randrange(256) for _ in range(11))])
            data[at + 124:at + 135] = value[:11].ljust(11, b"0")
        elif kind < 0.45:  # the type: directories, links, pax, long names, unknown
            data[at + 156] = rng.choice(b"0125xgLK\0Z")
        elif kind < 0.6:  # the name: another sample's, none, or bytes that are no text
            data[at:at + 100] = bytes(rng.randrange(256) if rng.random() < 0.3 else 0 for _ in range(100))
        elif kind < 0.7:  # a zeroed block
            data[at:at + TAR_BLOCK] = bytes(TAR_BLOCK)
        elif kind < 0.8:  # cut the file anywhere
            return data[:rng.randrange(len(data))]
        else:  # any bytes anywhere
            for _ in range(rng.randint(1, 16)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.7:  # most with a valid checksum, so the parser reads on
            _fix_checksum(data, at)
    return data


@pytest.mark.slow
def test_thousands_of_mutated_shards_end_fast_in_a_data_error_or_an_index(samples, tmp_path):
    originals = [shard(samples), shard(samples, pax=pax_record("path", f"{samples[0][0]}.png"))]
    headers = [_headers(data) for data in originals]
    path = tmp_path / "mutated.tar"
    for seed in range(FUZZ_CASES):
        rng = random.Random(seed)
        which = seed % 2
        path.write_bytes(mutate(originals[which], headers[which], rng))
        try:
            _bounded(path)
        except TookTooLong:
            pytest.fail(f"seed {seed}: the index took over {CASE_SECONDS} s")
        except DataError:
            raise AssertionError(f"seed {seed}: scan_shard (data.on_error=skip) raised") from None
        except Exception as exc:
            raise AssertionError(f"seed {seed}: {type(exc).__name__}: {exc}") from exc

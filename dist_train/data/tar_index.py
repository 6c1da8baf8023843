"""Index a local tar shard from its 512-byte headers: each sample's members, by offset and size.

Reads the headers only, seeking past member data: several times faster than `tarfile`.
Understands ustar, pax extended headers (which `webdataset.TarWriter` writes for float mtimes)
and GNU long names; links, directories and devices are skipped, as webdataset skips them. A
header that does not move the reader strictly forward inside the file (a negative size, a pax
record of length 0) is damage, named with its byte offset: a crafted shard cannot make the
reader loop (tests/test_tar_fuzz.py). A sample is webdataset's: the members that share a key
(the name up to the basename's first dot), stored together.
"""

from __future__ import annotations

import os

from dist_train.errors import DataError

TarIndex = list[tuple[str, dict[str, tuple[int, int]]]]  # [(key, {ext: (offset, size)})] in file order
Spans = list[tuple[int, int]]  # per sample of a TarIndex: [start, end) of its headers and data
TAR_BLOCK = 512
MAX_EXTENDED_HEADER = 1 << 20  # pax records or a GNU long name, in bytes
REGULAR = (b"0", b"\0", b"7")  # regular files (7: contiguous, read as regular by every reader)
# Links, devices, directories, FIFOs; global pax records, GNU long link names.
NOT_SAMPLES = (b"1", b"2", b"3", b"4", b"5", b"6", b"g", b"K")


def index_tar(path: str) -> TarIndex:
    """Each sample's key and members (offset and size of the data) of a local tar shard; a
    truncated or corrupt archive raises DataError."""
    return index_tar_spans(path)[0]


def index_tar_spans(path: str) -> tuple[TarIndex, Spans]:
    """`index_tar`, and each sample's span: the bytes from its first header (extended headers
    included) to the end of its last member's data, which `read_sample` reads back."""
    entries, spans, damage = index_tar_until_damage(path)
    if damage:
        raise DataError(f"{path}: unreadable tar shard ({damage.reason})")
    return entries, spans


def index_tar_until_damage(path: str) -> tuple[TarIndex, Spans, TarDamage | None]:
    """`index_tar_spans` of the samples before a truncation or corrupt header, and the damage
    (None for an intact archive)."""
    try:
        with open(path, "rb") as f:
            return *_index_headers(f, os.fstat(f.fileno()).st_size), None
    except OSError as exc:
        raise DataError(f"{path}: unreadable tar shard ({exc})") from None
    except TarDamage as cut:
        return cut.entries, cut.spans, cut


def read_sample(blob: bytes, where: str) -> tuple[str, dict[str, bytes]]:
    """(key, {ext: data}) of the one sample a span of a tar holds (`index_tar_spans`); `where`
    names the span in errors. The span was checked when it was indexed; read back, its first
    header's checksum and every member's bounds are checked again, enough to name a shard
    changed since (a span then no longer starts at a header) without the indexing's cost."""
    key, members, override = None, {}, {}
    pos, end = 0, len(blob)
    try:
        if end < TAR_BLOCK or _tar_checksum(blob[:TAR_BLOCK]) != _tar_number(blob[148:156]):
            raise ValueError("no tar header where the sample begins")
        while pos + TAR_BLOCK <= end:
            header = blob[pos:pos + TAR_BLOCK]
            kind, size, data = header[156:157], _tar_number(header[124:136]), pos + TAR_BLOCK
            if size < 0 or data + size > end:
                raise ValueError(f"a member of {size} bytes at byte {pos} of {end}")
            if kind in (b"x", b"L"):
                extra = blob[data:data + size]
                override = _pax_records(extra) if kind == b"x" else {"path": extra.split(b"\0", 1)[0].decode()}
            elif kind in REGULAR:
                size = int(override.get("size", size))
                name_key, ext = split_member_name(override.get("path") or _ustar_name(header))
                override = {}
                if name_key is not None and key not in (None, name_key):
                    raise ValueError(f"members of samples {key!r} and {name_key!r}")
                if name_key is not None:
                    key, members[ext.lower()] = name_key, blob[data:data + size]
            else:
                override = {}
            pos = data + _padded(size)
    except ValueError as exc:
        raise DataError(f"{where}: unreadable sample ({exc}; changed since it was indexed?)") from None
    if key is None:
        raise DataError(f"{where}: holds no sample (changed since it was indexed?)")
    return key, members


class TarDamage(Exception):
    """Where an archive stops being readable: the entries (and their spans) before it, why,
    and how many samples without an entry the damage is known to have cut (the one being read)."""

    def __init__(self, entries: TarIndex, reason: str, lost: int = 0, spans: Spans | None = None):
        super().__init__(reason)
        self.entries, self.reason, self.lost, self.spans = entries, reason, lost, spans or []


def _index_headers(f, end: int) -> tuple[TarIndex, Spans]:
    """Index the archive `f` of `end` bytes."""
    entries: TarIndex = []
    spans: Spans = []

    def damage(reason: str, lost: int = 0) -> TarDamage:
        return TarDamage(entries, reason, lost, spans)

    pos = 0
    first_header = 0  # where the next member's headers begin (its extended headers, or its own)
    extended = False  # an extended header was read for the next member
    override: dict[str, str] = {}  # from a pax or long-name header, for the next member
    try:
        while pos + TAR_BLOCK <= end:
            f.seek(pos)
            header = f.read(TAR_BLOCK)
            if header[0] == 0:  # end-of-archive blocks, then only zeros up to the file's end
                if not _zeros_to_end(f, pos):
                    raise damage(f"a zeroed block at byte {pos}, with data after it")
                break
            if _tar_checksum(header) != _tar_number(header[148:156]):
                raise damage(f"bad header checksum at byte {pos}")
            kind = header[156:157]
            size = _tar_number(header[124:136])
            if size < 0:  # "-0000001000": the next header would be this one, or one before
                raise damage(f"negative member size at byte {pos}")
            data = pos + TAR_BLOCK
            if not extended:
                first_header = pos
            if kind in (b"x", b"L"):
                if data + size > end:
                    raise damage(f"truncated: the extended header at byte {pos} ends past the file")
                if size > MAX_EXTENDED_HEADER:  # names and pax records are short; this is no header
                    raise damage(f"an extended header of {size} bytes at byte {pos}")
                f.seek(data)
                extra = f.read(size)
                override = _pax_records(extra) if kind == b"x" else {"path": extra.split(b"\0", 1)[0].decode()}
                extended = True
            elif kind in NOT_SAMPLES:
                override, extended = {}, False  # skipped, as webdataset skips them: only regular files are members
            elif kind not in REGULAR:
                raise damage(f"member type {kind.decode('latin-1')!r} at byte {pos} is not supported")
            else:
                size = int(override.get("size", size))
                if size < 0:
                    raise damage(f"negative member size at byte {pos} (pax header)")
                name = override.get("path") or _ustar_name(header)
                override, extended = {}, False
                key, ext = split_member_name(name)
                if data + size > end:
                    # A sample whose first member is cut has no entry: count it anyway.
                    lost = 1 if key is not None and (not entries or entries[-1][0] != key) else 0
                    raise damage(f"truncated: member {name!r} ends past the file", lost)
                if key is not None:
                    if not entries or entries[-1][0] != key:
                        entries.append((key, {}))
                        spans.append((first_header, first_header))
                    entries[-1][1][ext.lower()] = (data, size)
                    spans[-1] = (spans[-1][0], data + _padded(size))
            if data + size > end:
                raise damage("truncated: a header's data ends past the file")
            pos = data + _padded(size)
    except ValueError:
        raise damage(f"malformed header at byte {pos}") from None
    return entries, spans


def _padded(size: int) -> int:
    """Bytes a member's data takes: tar pads it to whole blocks."""
    return (size + TAR_BLOCK - 1) // TAR_BLOCK * TAR_BLOCK


def _zeros_to_end(f, pos: int) -> bool:
    """Whether the file holds only zero bytes from `pos` on (tar pads its end with them)."""
    f.seek(pos)
    while block := f.read(1 << 20):
        if block.count(0) != len(block):
            return False
    return True


def _ustar_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") if header[257:262] == b"ustar" else ""
    return f"{prefix}/{name}" if prefix else name


def _pax_records(data: bytes) -> dict[str, str]:
    """`<length> <key>=<value>\n` records, each length counting its whole record."""
    records, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        # A length that does not reach past its own digits, or past the data, would never
        # move on (0, negative) or read beyond the header: the header is malformed.
        if not space - pos < length <= len(data) - pos:
            raise ValueError(f"pax record length {length}")
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[key.decode()] = value.decode("utf-8", "replace")
        pos += length
    return records


def _tar_number(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256 for large values
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _tar_checksum(header: bytes) -> int:
    return sum(header[:148]) + 8 * 0x20 + sum(header[156:])


def split_member_name(name: str) -> tuple[str | None, str]:
    """(key, extension) of a member `dir/key.ext.more`, as webdataset splits it: the key ends
    at the basename's first dot. (None, "") for names without one."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None, ""
    return (f"{head}/{stem}" if head else stem), ext

"""Object storage and web servers as shard sources: `https://`, `http://` and `s3://` URLs.

Access goes through fsspec (aiohttp for HTTP, s3fs for S3): credentials and endpoints come
from the environment or the usual config files (`AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT_URL`,
`~/.aws/credentials`, ...), never from dist-train's config, and are never logged.

Every call is retried: a transient failure (connection refused or reset, a timeout, a 5xx
answer, S3 throttling) waits with exponential backoff and tries again, each retry one line
on stderr with its number; a missing or forbidden object (404/403, NoSuchKey) is a DataError
naming the URL at once, as is a transient failure that outlasts the retry budget (a count and
a wall-clock deadline).

Timeouts are of inactivity, never of a whole transfer: a connection must open within
CONNECT_TIMEOUT_S and some bytes must come every READ_TIMEOUT_S, so a slow but live server is
waited for (aiohttp's default cuts every GET at 300 s, whatever its progress) and a stalled
one is retried. A shard is downloaded in Range requests of CHUNK_BYTES appended to its
`.part`, so a retry resumes from the last whole chunk instead of byte 0. A manifest is read
to MAX_MANIFEST_BYTES at most (a never-ending answer cannot fill the memory).
"""

from __future__ import annotations

import os
import posixpath
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from dist_train.errors import DataError

REMOTE_SCHEMES = ("http://", "https://", "s3://")
RETRIES = 8  # attempts after the first: backoff 0.5, 1, 2, 4, 8, 10, 10, 10 s (about 45 s)
FIRST_WAIT_S = 0.5
MAX_WAIT_S = 10.0
RETRY_DEADLINE_S = 600.0  # no retry of a call starts later than this after its first attempt
CONNECT_TIMEOUT_S = 30.0
READ_TIMEOUT_S = 60.0  # no byte for this long: the transfer is stalled, not slow
CHUNK_BYTES = 16 << 20
MAX_MANIFEST_BYTES = 64 << 20  # dataset.json of 1.28M samples in 1,000 shards is ~0.3 MB

T = TypeVar("T")


def is_remote(spec: str) -> bool:
    return spec.startswith(REMOTE_SCHEMES)


def join(base: str, name: str) -> str:
    """`name` (a relative path from a manifest) under the remote directory `base`."""
    return f"{base.rstrip('/')}/{name}"


def parent(url: str) -> str:
    scheme, _, path = url.partition("://")
    return f"{scheme}://{posixpath.dirname(path)}"


def basename(url: str) -> str:
    return posixpath.basename(url.partition("://")[2].split("?", 1)[0])


def size(url: str) -> int:
    """The object's size in bytes, as the server reports it."""
    info = with_retries(url, lambda: _fs(url).info(url))
    if info.get("size") is None:
        raise DataError(f"{url}: the server does not report the object's size")
    return int(info["size"])


def sizes(urls: list[str]) -> list[int]:
    """`size` of each URL, asked concurrently: a missing object stops the run before it starts."""
    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(size, urls))


def read_bytes(url: str, limit: int = MAX_MANIFEST_BYTES) -> bytes:
    """The whole (small) object; more than `limit` bytes is an error, read no further."""
    def bounded() -> bytes:
        chunks, total = [], 0
        with _fs(url).open(url, "rb") as f:
            while total <= limit and (chunk := f.read(limit + 1 - total)):  # a stream gives what came so far
                chunks.append(chunk)
                total += len(chunk)
        return b"".join(chunks)

    data = with_retries(url, bounded)
    if len(data) > limit:
        raise DataError(f"{url}: larger than {limit >> 20} MiB, not a manifest")
    return data


def exists(url: str) -> bool:
    try:
        size(url)
    except MissingObject:
        return False
    return True


def download(url: str, local_path: str, size: int) -> None:
    """The object's `size` bytes appended to `local_path` from where it ends (which the caller
    renames once it is checked), in Range requests of CHUNK_BYTES each retried on its own."""
    try:
        with open(local_path, "ab") as f:
            while (have := f.tell()) < size:
                end = min(have + CHUNK_BYTES, size)
                chunk = with_retries(url, lambda: _fs(url).cat_file(url, start=have, end=end))  # noqa: B023
                whole = have == 0 and len(chunk) == size  # a server that ignores Range sends it all: as good
                if len(chunk) < end - have:
                    raise DataError(f"{url}: downloaded {have + len(chunk)} bytes, expected {size} (changed on the "
                                    "server?)")
                if len(chunk) > end - have and not whole:
                    raise DataError(f"{url}: {len(chunk)} bytes came for a range of {end - have}: the server "
                                    "ignores Range requests")
                f.write(chunk)
    except OSError as exc:  # the local disk, not the network: retrying cannot help
        raise DataError(f"{local_path}: cannot write the copy of {url} ({exc.strerror or exc}); free the disk or "
                        "set data.cache_dir") from None


def upload(local_path: str, url: str) -> None:
    with_retries(url, lambda: _fs(url).put_file(local_path, url))


def publish(local_dir: str, url: str) -> None:
    """Upload a dataset directory written by make-shards: the shards, then `dataset.json` last
    (as locally, a dataset with a manifest is complete). S3 only: a web server is read-only."""
    if not url.startswith("s3://"):
        raise DataError(f"{url}: only s3:// destinations can be written; copy the directory to the web server")
    manifest = "dataset.json"
    if exists(join(url, manifest)):
        raise DataError(f"{url} already holds a dataset ({manifest}); choose an empty prefix")
    files = sorted(os.listdir(local_dir))
    for name in [f for f in files if f != manifest] + [manifest]:
        try:
            upload(os.path.join(local_dir, name), join(url, name))
        except MissingObject:
            raise DataError(f"{url}: cannot be written (no such bucket, or no permission)") from None


class MissingObject(DataError):
    """The object does not exist or may not be read: retrying cannot help."""


class AccessDenied(MissingObject):
    """It may exist, and may not be read with these credentials (403)."""


def with_retries(url: str, call: Callable[[], T], retries: int | None = None) -> T:
    """`call()`, retried with backoff while it fails for a reason that may pass."""
    retries = RETRIES if retries is None else retries
    deadline = time.monotonic() + RETRY_DEADLINE_S
    for attempt in range(retries + 1):
        try:
            return call()
        except Exception as exc:  # sorted below: transient ones are retried
            # fsspec's HTTP client reports a refused connection as FileNotFoundError: its cause
            # tells a server that is away from an object that is not there.
            cause = exc.__cause__ if isinstance(exc.__cause__, Exception) else None
            reason = _transient_reason(exc) or (cause and _transient_reason(cause))
            if cause is not None and type(cause).__name__ == "TooManyRedirects":  # fsspec says "not found"
                raise DataError(f"{url}: {_described(cause)}") from None
            if reason is None and isinstance(exc, (FileNotFoundError, PermissionError)):
                missing = AccessDenied if isinstance(exc, PermissionError) else MissingObject
                raise missing(f"{url}: {_missing_reason(exc)}") from None
            if reason is None:
                raise DataError(f"{url}: {_described(exc)}") from None
            wait = min(FIRST_WAIT_S * 2**attempt, MAX_WAIT_S)
            if attempt == retries or time.monotonic() + wait > deadline:
                raise DataError(f"{url}: still failing after {attempt} retries in "
                                f"{time.monotonic() - deadline + RETRY_DEADLINE_S:.0f} s ({reason})") from None
            print(f"dist-train: warning: {url}: {reason}; retry {attempt + 1} of {retries} in {wait:g} s",
                  file=sys.stderr, flush=True)
            _wait(wait, url)
    raise AssertionError("unreachable")


def _wait(seconds: float, url: str) -> None:
    """Sleep before a retry; a stop signal received during start-up ends the wait (and the run)."""
    from dist_train.runtime.preemption import stop_if_requested_in_startup

    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        stop_if_requested_in_startup(url)
        time.sleep(min(left, 0.1))
    stop_if_requested_in_startup(url)


def _missing_reason(exc: OSError) -> str:
    if isinstance(exc, PermissionError):
        return "access denied (403): check the credentials in the environment"
    return "not found (404 / NoSuchKey)"


def _transient_reason(exc: Exception) -> str | None:
    """Why a failure may pass (a connection problem, a timeout, a 5xx), or None if it will not."""
    status = _http_status(exc)
    if status is not None:
        return f"HTTP {status}" if status >= 500 or status in (408, 429) else None
    code = _s3_error_code(exc)
    if code is not None:
        transient = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                     "InternalError", "ServiceUnavailable", "503", "500"}
        return f"S3 {code}" if code in transient else None
    if isinstance(exc, (FileNotFoundError, PermissionError)):
        return None
    if isinstance(exc, (ConnectionError, TimeoutError, OSError)) or _is_client_connection_error(exc):
        return _short(exc) or type(exc).__name__
    return None


def _http_status(exc: Exception) -> int | None:
    status = getattr(exc, "status", None)
    return status if isinstance(status, int) else None


def _s3_error_code(exc: Exception) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        return str(code) if code is not None else None
    return None


def _is_client_connection_error(exc: Exception) -> bool:
    """aiohttp's and botocore's connection failures, which are not all OSErrors."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & {"ClientConnectionError", "ServerDisconnectedError", "ClientPayloadError",
                         "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError",
                         "ConnectTimeoutError", "ResponseStreamingError", "IncompleteReadError"})


def _described(exc: Exception) -> str:
    """A failure that will not pass, in words (aiohttp's own say "0, message=''" of some)."""
    if type(exc).__name__ == "TooManyRedirects":
        return "too many redirects (a redirect loop on the server?)"
    return _short(exc) or type(exc).__name__


def _short(exc: Exception) -> str:
    return " ".join(str(exc).split())[:200]


def _fs(url: str):
    """The fsspec filesystem for this URL's scheme; one instance per process (fsspec caches)."""
    import fsspec

    protocol = url.partition("://")[0]
    if protocol in ("http", "https"):
        import aiohttp

        # No listing of directories and no cache of responses: we ask for known objects only.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S)
        return fsspec.filesystem(protocol, block_size=0, client_kwargs={"timeout": timeout})
    fs = fsspec.filesystem(protocol, config_kwargs={"connect_timeout": CONNECT_TIMEOUT_S,
                                                    "read_timeout": READ_TIMEOUT_S})
    # s3fs retries failures itself, five times with growing waits; one layer of retries
    # (ours: counted, logged, with one budget for both schemes) is enough.
    fs.retries = 1
    return fs

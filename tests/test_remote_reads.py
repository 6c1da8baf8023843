"""Remote reads against a misbehaving web server (a small one written here, run in a thread:
it fails, stalls or never ends on purpose, which nginx does not): a cut download resumes
from its last whole chunk, a stalled one is retried after an inactivity timeout and given up
within the deadline, a never-ending manifest is refused at its limit, a full disk is one line."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dist_train.data import remote
from dist_train.errors import DataError

BODY = bytes(range(256)) * 40  # 10,240 bytes


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.ranges: list[str] = []  # the Range header of every GET
        self.fail_request = -1  # this GET (counted from 0) is answered 503
        self.stall = False  # answer nothing, keep the connection open

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    server: Server

    def log_message(self, *args) -> None:  # quiet
        pass

    def whole(self) -> None:
        """Answer as a server without Range support: the whole object, 200."""
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def do_GET(self) -> None:
        server = self.server
        server.ranges.append(self.headers.get("Range", ""))
        if server.stall:
            time.sleep(30)
            return
        if len(server.ranges) - 1 == server.fail_request:
            self.send_error(503)
            return
        if self.path.endswith("loop.json"):  # a redirect to itself
            self.send_response(302)
            self.send_header("Location", self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path.endswith("endless.json"):  # chunked, and never done
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = b"[" * 65536
            try:
                while True:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except (BrokenPipeError, ConnectionResetError):
                return
        start, end = 0, len(BODY) - 1
        if spec := self.headers.get("Range"):
            first, last = spec.removeprefix("bytes=").split("-")
            start, end = int(first), min(int(last), len(BODY) - 1)
        self.send_response(206 if spec else 200)
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        self.wfile.write(BODY[start:end + 1])


@pytest.fixture
def server():
    server = Server()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def quick_retries(monkeypatch):
    monkeypatch.setattr(remote, "FIRST_WAIT_S", 0.01)
    monkeypatch.setattr(remote, "MAX_WAIT_S", 0.02)


def test_a_cut_download_resumes_from_its_last_whole_chunk(server, quick_retries, tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(remote, "CHUNK_BYTES", 4096)
    server.fail_request = 2  # the third chunk's first try
    remote.download(f"{server.url}/shard.tar", str(tmp_path / "copy"), len(BODY))
    assert (tmp_path / "copy").read_bytes() == BODY
    assert server.ranges == ["bytes=0-4095", "bytes=4096-8191", "bytes=8192-10239", "bytes=8192-10239"]
    assert "HTTP 503; retry 1 of 8" in capfd.readouterr().err


@pytest.mark.alone  # timed
def test_a_stalled_server_is_retried_after_the_read_timeout_and_given_up_by_the_deadline(server, quick_retries,
                                                                                        tmp_path, monkeypatch):
    monkeypatch.setattr(remote, "READ_TIMEOUT_S", 0.5)
    monkeypatch.setattr(remote, "RETRY_DEADLINE_S", 1.2)
    server.stall = True
    started = time.monotonic()
    with pytest.raises(DataError, match=r"shard\.tar: still failing after \d retries in \d s"):
        remote.download(f"{server.url}/shard.tar", str(tmp_path / "copy"), len(BODY))
    assert 1.0 < time.monotonic() - started < 5 and len(server.ranges) >= 2  # retried, then stopped


def test_a_never_ending_manifest_is_refused_at_its_limit(server, monkeypatch):
    monkeypatch.setattr(remote, "MAX_MANIFEST_BYTES", 1 << 20)
    with pytest.raises(DataError, match=r"endless\.json: larger than 1 MiB, not a manifest"):
        remote.read_bytes(f"{server.url}/endless.json", limit=1 << 20)


def test_a_full_disk_is_one_line_not_a_network_retry(server, tmp_path, monkeypatch):
    real_open = open

    class Full:
        def __init__(self, path, mode):
            self.f = real_open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def tell(self):
            return self.f.tell()

        def write(self, data):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr("builtins.open", lambda path, mode="r", *a, **k: Full(path, mode)
                        if str(path).endswith("copy") else real_open(path, mode, *a, **k))
    with pytest.raises(DataError, match=r"copy: cannot write the copy of .*shard\.tar \(No space left on device\)"):
        remote.download(f"{server.url}/shard.tar", str(tmp_path / "copy"), len(BODY))
    assert len(server.ranges) == 1


def test_a_redirect_loop_says_so(server):
    with pytest.raises(DataError, match=r"loop\.json: too many redirects \(a redirect loop on the server\?\)$"):
        remote.read_bytes(f"{server.url}/loop.json")


@pytest.mark.alone  # timed
def test_a_stop_signal_during_start_up_ends_the_wait_for_a_failing_server(server, tmp_path, monkeypatch):
    """SIGTERM while start-up retries a server that answers 503: the process stops at the next
    wait (exit 75 through TrainingStopped), not after 8 retries or the 600 s deadline."""
    import os
    import signal

    from dist_train.runtime import preemption

    monkeypatch.setattr(remote, "FIRST_WAIT_S", 2.0)
    server.fail_request = 0
    preemption.catch_stop_signals()
    try:
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
        started = time.monotonic()
        with pytest.raises(preemption.TrainingStopped, match=r"signal 15 \(SIGTERM\) during start-up, while waiting "
                                                            r"for http://.*/dataset\.json") as caught:
            remote.read_bytes(f"{server.url}/dataset.json")
        assert caught.value.exit_code == preemption.EXIT_PREEMPTED and time.monotonic() - started < 1.5
    finally:
        preemption.release_stop_signals()


def test_a_shard_shorter_than_its_manifest_says_and_a_server_without_ranges(server, tmp_path, monkeypatch):
    """A range past the object's end comes short: named as the bytes it got and wanted. A
    server that ignores Range sends the whole object to the first request: taken as it is."""
    with pytest.raises(DataError, match=r"shard\.tar: downloaded 10240 bytes, expected 10752 \(changed on the server"):
        remote.download(f"{server.url}/shard.tar", str(tmp_path / "short"), len(BODY) + 512)
    monkeypatch.setattr(Handler, "do_GET", lambda self: (self.server.ranges.append(self.headers.get("Range", "")),
                                                         Handler.whole(self)))
    monkeypatch.setattr(remote, "CHUNK_BYTES", 4096)
    before = len(server.ranges)
    remote.download(f"{server.url}/shard.tar", str(tmp_path / "whole"), len(BODY))
    assert (tmp_path / "whole").read_bytes() == BODY and server.ranges[before:] == ["bytes=0-4095"]

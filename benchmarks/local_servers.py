"""Real object servers on 127.0.0.1, for `dist-train bench` and the tests: nginx serving a
directory over HTTP, and moto's S3 API server.

Each is a child process with its own temporary directory, stopped with it; nginx's access log
says which objects were fetched and how often. Neither is needed to train: they stand in for
a web server or an object store on a real network.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EPHEMERAL_LOW = 32768  # Linux's default start of ip_local_port_range
NGINX_CONF = """\
daemon off;
user {user};
pid {run}/nginx.pid;
error_log {run}/error.log;
worker_processes 1;
events {{ worker_connections 256; }}
http {{
  access_log {run}/access.log;
  client_body_temp_path {run}/body; proxy_temp_path {run}/proxy; fastcgi_temp_path {run}/fastcgi;
  uwsgi_temp_path {run}/uwsgi; scgi_temp_path {run}/scgi;
  sendfile on;
  server {{
    listen 127.0.0.1:{port};
    root {root};
    {limit}
  }}
}}
"""


def free_port() -> int:
    """A free port on 127.0.0.1 below the kernel's ephemeral range. A port from that range can
    become the local end of any outgoing connection while its server is stopped (the outage tests
    stop nginx and start it again on the same port), and a connect to 127.0.0.1 from the port
    itself joins the socket to itself: a "server" that answers nothing."""
    low = EPHEMERAL_LOW
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    for _ in range(100):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # a crowded range: any port the kernel gives
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, what: str, log: Path | None = None,
                   timeout: float = 30.0) -> None:
    """Until `process` listens on `port`; its exit first is an error that quotes its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            said = log.read_text().strip()[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} exited with status {process.returncode} at start"
                               + (f": {said}" if said else ""))
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0 and process.poll() is None:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


class Nginx:
    """nginx serving `root` on 127.0.0.1; `rate` (bytes/s per connection) limits each answer."""

    def __init__(self, root: str | Path, rate: int | None = None, port: int | None = None):
        binary = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
        if binary is None:
            raise FileNotFoundError("nginx is not installed (Debian: apt-get install nginx-light)")
        self.binary = binary
        self.root = Path(root).resolve()
        self.port = port or free_port()
        self.run_dir = Path(tempfile.mkdtemp(prefix="dist-train-nginx-"))
        limit = f"limit_rate {rate};" if rate else ""
        self.conf = self.run_dir / "nginx.conf"
        # Workers run as this user (not nginx's www-data), so they read what the caller can.
        user = pwd.getpwuid(os.getuid()).pw_name
        conf = NGINX_CONF.format(user=user, run=self.run_dir, port=self.port, root=self.root, limit=limit)
        self.conf.write_text(conf)
        self.process: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def access_log(self) -> Path:
        return self.run_dir / "access.log"

    def start(self) -> None:
        self.process = subprocess.Popen([self.binary, "-c", str(self.conf), "-e", str(self.run_dir / "error.log")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for_port(self.port, self.process, "nginx", self.run_dir / "error.log")

    def stop(self) -> None:
        """Stop at once (connections in flight are cut), as a crashed or rebooted server does."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)

    def requests(self) -> list[tuple[str, str, int, int]]:
        """(method, path, status, body bytes sent) of every request answered so far."""
        lines = self.access_log.read_text().splitlines() if self.access_log.exists() else []
        out = []
        for line in lines:  # nginx's "combined" format
            request = line.split('"')[1].split()
            status, sent = line.split('"')[2].split()[:2]
            out.append((request[0], request[1], int(status), int(sent)))
        return out

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.run_dir, ignore_errors=True)


class S3Server:
    """moto's S3 API server on 127.0.0.1; `env` points boto3 / s3fs clients at it."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        server = Path(sys.executable).parent / "moto_server"
        command = [str(server)] if server.exists() else [sys.executable, "-m", "moto.server"]
        self.process = subprocess.Popen([*command, "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for_port(self.port, self.process, "the S3 server (moto)")

    @property
    def env(self) -> dict[str, str]:
        """Credentials and endpoint as a user sets them for any S3-compatible store."""
        return {"AWS_ACCESS_KEY_ID": "dist-train-test", "AWS_SECRET_ACCESS_KEY": "dist-train-test",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}"}

    def make_bucket(self, name: str) -> None:
        import boto3

        env = self.env
        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                              aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
        client.create_bucket(Bucket=name)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)

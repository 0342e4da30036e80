"""TensorBoard events written by the trainer's writer, synced to file:// storage, read back by TensorBoard."""

from pathlib import Path

import pytest

from bagel.platform.metrics.tensorboard import TensorBoardSync, read_scalars


def test_tensorboard_scalars_read_back(tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    writer = TensorBoardSync(remote.as_uri(), local_dir=str(tmp_path / "local"), sync_every_s=3600)
    tags = ["loss/total", "loss/ce", "loss/mse", "lr", "grad_norm", "tokens_per_s", "mfu"]
    for step in range(1, 7):
        writer.add_scalars(step, {tag: step * 0.5 for tag in tags} | {"loss/absent": None})
        if step % 2 == 0:
            writer.sync()
    writer.close()

    scalars = read_scalars(str(remote))
    for tag in tags:
        assert [step for step, _ in scalars[tag]] == [1, 2, 3, 4, 5, 6]
        assert scalars[tag][-1][1] == 3.0
    assert "loss/absent" not in scalars


def test_sync_uploads_each_byte_once(tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    writer = TensorBoardSync(remote.as_uri(), sync_every_s=3600)
    for step in range(50):
        writer.add_scalars(step, {"loss": float(step)})
        if step % 10 == 9:
            writer.sync()
    writer.sync()  # nothing new: must not upload an empty segment
    writer.close()

    remote_files = sorted(remote.iterdir())
    assert len(remote_files) == 5
    assert [f.name for f in remote_files] == sorted(writer.uploaded_files)
    # Bytes sent equal the bytes stored: no event file was sent twice or in part.
    assert writer.uploaded_bytes == sum(f.stat().st_size for f in remote_files)
    assert len(read_scalars(str(remote))["loss"]) == 50


def test_close_twice_is_safe(tmp_path: Path) -> None:
    writer = TensorBoardSync((tmp_path / "r").as_uri(), sync_every_s=3600)
    writer.add_scalars(1, {"x": 1.0})
    writer.close()
    writer.close()
    writer.add_scalars(2, {"x": 2.0})  # ignored after close
    assert read_scalars(str(tmp_path / "r"))["x"] == [(1, 1.0)]


def test_background_thread_syncs(tmp_path: Path) -> None:
    import time

    remote = tmp_path / "remote"
    writer = TensorBoardSync(remote.as_uri(), sync_every_s=0.2)
    writer.add_scalars(1, {"x": 1.0})
    deadline = time.monotonic() + 10
    while not writer.uploaded_files and time.monotonic() < deadline:
        time.sleep(0.05)
    assert writer.uploaded_files, "the background thread uploaded nothing within 10 s"
    writer.close()


@pytest.mark.s3
def test_sync_to_s3_uploads_each_segment_once(s3_server, tmp_path: Path) -> None:
    """Event files reach a real S3 server (SeaweedFS on loopback) one closed segment at a time."""
    import fsspec

    s3_server.make_bucket("tb-sync")
    writer = TensorBoardSync("s3://tb-sync/run/tensorboard", sync_every_s=3600, storage_options=s3_server.storage_options)
    for step in range(30):
        writer.add_scalars(step, {"loss/total": 1.0 / (step + 1)})
        if step % 10 == 9:
            writer.sync()
    writer.close()

    fs = fsspec.filesystem("s3", **s3_server.storage_options)
    objects = fs.ls("tb-sync/run/tensorboard", detail=True)
    assert len(objects) == 3
    assert writer.uploaded_bytes == sum(obj["size"] for obj in objects)
    local = tmp_path / "download"
    local.mkdir()
    for obj in objects:
        fs.get_file(obj["name"], str(local / Path(obj["name"]).name))
    assert [step for step, _ in read_scalars(str(local))["loss/total"]] == list(range(30))


def _children(pid: int) -> list[int]:
    """Return the pids whose parent is `pid` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_sigterm_stops_tensorboard_child(tmp_path: Path) -> None:
    """SIGTERM to `bagel tensorboard` alone (not its process group) also stops the TensorBoard it started."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    writer = TensorBoardSync((tmp_path / "logs").as_uri(), local_dir=str(tmp_path / "local"), sync_every_s=3600)
    writer.add_scalars(1, {"loss/total": 1.0})
    writer.close()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "bagel.platform", "tensorboard", str(tmp_path / "logs"), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    children: list[int] = []
    try:
        assert process.stdout is not None
        assert process.stdout.readline().startswith("TensorBoard: http://127.0.0.1:")
        children = _children(process.pid)
        assert children
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        deadline = time.monotonic() + 15
        while any(Path(f"/proc/{child}").exists() for child in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(Path(f"/proc/{child}").exists() for child in children)
    finally:
        for child in children:
            if Path(f"/proc/{child}").exists():
                os.kill(child, signal.SIGKILL)
        if process.poll() is None:
            process.kill()

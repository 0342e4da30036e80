"""TensorBoard scalars written locally by rank 0 and synced to the run's storage in the background.

Object stores cannot append, so re-uploading a growing event file on every
flush costs O(size) per flush and O(size^2) over a run. This writer rotates
instead: every sync closes the current event file (a "segment") and starts a
new one, and each closed segment is uploaded exactly once. TensorBoard reads
all event files of a run directory in file-name order, so the remote names
start with a zero-padded creation time and sequence number.

Remote layout: {tensorboard_uri}/events.out.tfevents.{unix_time:010d}.{seq:06d}.{host}
"""

import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)


class TensorBoardSync:
    """A scalar writer whose event files are rotated and uploaded to `remote_uri` (file:// or s3://).

    Thread-safe: `add_scalars` from the training loop, syncs from a background
    thread every `sync_every_s` seconds, and `close()` (also on SIGTERM) flushes
    and uploads what remains, synchronously.
    """

    def __init__(
        self,
        remote_uri: str,
        local_dir: str = "",
        sync_every_s: float = 60.0,
        storage_options: dict | None = None,
    ) -> None:
        import fsspec

        from bagel.platform.s3_endpoint import with_s3_endpoint

        self.remote_uri = remote_uri.rstrip("/")
        self._owns_local = not local_dir
        self.local_dir = Path(local_dir or tempfile.mkdtemp(prefix="bagel-tb-"))
        self.local_dir.mkdir(parents=True, exist_ok=True)
        self.sync_every_s = sync_every_s
        self.fs, self.remote_path = fsspec.core.url_to_fs(self.remote_uri, **with_s3_endpoint(self.remote_uri, storage_options))
        self.fs.makedirs(self.remote_path, exist_ok=True)
        self.host = socket.gethostname().replace(".", "-")
        self.uploaded_bytes = 0  # every byte sent, so tests can check nothing is sent twice
        self.uploaded_files: list[str] = []
        self._lock = threading.Lock()
        self._seq = 0
        self._writer = None
        self._segment_dir: Path | None = None
        self._segment_time = 0
        self._segment_has_data = False
        self._closed = False
        self._stop = threading.Event()
        self._open_segment()
        self._thread = threading.Thread(target=self._run, name="tensorboard-sync", daemon=True)
        self._thread.start()
        logger.info("TensorBoard events: %s (local %s, synced every %.0f s)", self.remote_uri, self.local_dir, sync_every_s)

    def add_scalars(self, step: int, scalars: dict[str, float | None]) -> None:
        """Write one value per tag at `step`; None values (absent terms) are left out."""
        with self._lock:
            if self._closed:
                return
            for tag, value in scalars.items():
                if value is not None:
                    self._writer.add_scalar(tag, float(value), global_step=step)
                    self._segment_has_data = True

    def sync(self) -> None:
        """Close the current segment, upload it and start a new one (a no-op when it is empty)."""
        with self._lock:
            if self._closed or not self._segment_has_data:
                return
            finished = self._close_segment()
            self._open_segment()
        self._upload(*finished)

    def close(self) -> None:
        """Flush, upload the last segment and stop the background thread; safe to call twice."""
        self._stop.set()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            finished = self._close_segment() if self._segment_has_data else None
            if finished is None and self._writer is not None:
                self._writer.close()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        if finished is not None:
            self._upload(*finished)
        if self._owns_local:
            shutil.rmtree(self.local_dir, ignore_errors=True)

    def _open_segment(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._seq += 1
        self._segment_dir = self.local_dir / f"segment-{self._seq:06d}"
        self._segment_time = int(time.time())
        self._writer = SummaryWriter(log_dir=str(self._segment_dir), max_queue=1000, flush_secs=3600)
        self._segment_has_data = False

    def _close_segment(self) -> tuple[Path, str]:
        self._writer.close()
        files = sorted(self._segment_dir.glob("events.out.tfevents.*"))
        if len(files) != 1:
            raise RuntimeError(f"expected one event file in {self._segment_dir}, found {len(files)}")
        name = f"events.out.tfevents.{self._segment_time:010d}.{self._seq:06d}.{self.host}"
        return files[0], name

    def _upload(self, local: Path, name: str) -> None:
        target = f"{self.remote_path}/{name}"
        try:
            self.fs.put_file(str(local), target)
        except Exception as error:  # noqa: BLE001  # storage errors must not kill training
            logger.warning("TensorBoard upload of %s to %s failed (%s); it stays in %s", name, self.remote_uri, error, local)
            return
        self.uploaded_bytes += local.stat().st_size
        self.uploaded_files.append(name)
        shutil.rmtree(local.parent, ignore_errors=True)

    def _run(self) -> None:
        while not self._stop.wait(self.sync_every_s):
            try:
                self.sync()
            except Exception as error:  # noqa: BLE001  # keep syncing after a transient failure
                logger.warning("TensorBoard sync failed: %s", error)


def read_scalars(directory: str) -> dict[str, list[tuple[int, float]]]:
    """Return {tag: [(step, value), ...]} of all event files in a local directory, read by TensorBoard's own loader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(os.fspath(directory), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}

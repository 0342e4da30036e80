"""A DCP storage writer that checksums every file it writes and commits with a MANIFEST.

`ManifestWriter` is torch's `FsspecWriter` with two additions:
- each rank hashes its shard files while writing them (no read-back), and the
  sizes and SHA-256s travel to the coordinator inside the write results DCP
  already gathers;
- the coordinator, after DCP's own `.metadata`, writes MANIFEST as the last
  file, which commits the checkpoint (see `manifest.py`).
"""

import dataclasses
import hashlib
import io
import os
import posixpath
from collections.abc import Generator
from contextlib import contextmanager
from typing import Any

from torch.futures import Future
from torch.distributed.checkpoint._fsspec_filesystem import FileSystem, FsspecWriter
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner
from torch.distributed.checkpoint.storage import WriteResult

from bagel.platform.checkpoint import storage
from bagel.platform.checkpoint.manifest import FileRecord, Manifest, write_manifest

_METADATA_NAME = ".metadata"


class _HashingStream(io.RawIOBase):
    """Forward writes to `raw` and hash them on the way; DCP needs write, tell and fileno."""

    def __init__(self, raw: Any, on_close: Any) -> None:
        self.raw = raw
        self.digest = hashlib.sha256()
        self.size = 0
        self._on_close = on_close

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        written = self.raw.write(view)
        # fsspec streams return None or the length; treat both as the whole buffer
        # because a short write would already have raised.
        self.digest.update(view)
        self.size += len(view)
        return len(view) if written is None else written

    def tell(self) -> int:
        return self.raw.tell()

    def flush(self) -> None:
        if not self.closed:
            self.raw.flush()

    def fileno(self) -> int:
        return self.raw.fileno()

    def close(self) -> None:
        if self.closed:
            return
        self.raw.flush()
        super().close()
        self.raw.close()
        self._on_close(self.size, self.digest.hexdigest())


class _HashingFileSystem(FileSystem):
    """fsspec FileSystem that records (size, sha256) of every file opened for writing, by base name."""

    def __init__(self) -> None:
        super().__init__()
        self.records: dict[str, FileRecord] = {}

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Generator[io.IOBase, None, None]:
        with super().create_stream(path, mode) as stream:
            if "w" not in mode:
                yield stream
                return
            name = posixpath.basename(os.fspath(path))

            def record(size: int, sha256: str) -> None:
                self.records[name] = FileRecord(size, sha256)

            hashing = _HashingStream(stream, record)
            # On an exception the stream stays open: closing would commit a
            # partial object on S3, and the base class deletes the file anyway.
            yield hashing
            hashing.close()


@dataclasses.dataclass
class _RecordedStorageInfo(_StorageInfo):
    """A `_StorageInfo` that also carries its whole file's record to the coordinator.

    Exists only between `write_data` and `finish`; `finish` converts it back,
    so `.metadata` contains plain `_StorageInfo` objects only.
    """

    file_size: int = -1
    file_sha256: str = ""


class ManifestWriter(FsspecWriter):
    """FsspecWriter that writes MANIFEST (sizes and SHA-256 of every file) after `.metadata`.

    `step`, `world_size` and `extra` go into the MANIFEST. Extra keyword
    arguments are fsspec storage options.
    """

    def __init__(
        self,
        path: str,
        *,
        step: int,
        world_size: int,
        extra: dict[str, Any] | None = None,
        thread_count: int = 1,
        **storage_options: Any,
    ) -> None:
        super().__init__(
            path,
            single_file_per_rank=True,
            # Object stores make a file durable when its upload completes; fsync
            # there would fall back to os.sync() of the whole host per file.
            sync_files=not storage.is_remote(str(path)),
            thread_count=thread_count,
            overwrite=True,
            **storage_options,
        )
        self.fs = _HashingFileSystem()
        self.path = self.fs.init_path(path, **storage_options)
        self.step = step
        self.world_size = world_size
        self.extra = dict(extra or {})
        self.manifest: Manifest | None = None  # set on the coordinator by finish()

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        results = super().write_data(plan, planner).wait()
        tagged = []
        for result in results:
            info = result.storage_data
            record = self.fs.records[info.relative_path]
            tagged_info = _RecordedStorageInfo(
                info.relative_path, info.offset, info.length, info.transform_descriptors, record.size, record.sha256
            )
            tagged.append(dataclasses.replace(result, storage_data=tagged_info))
        future: Future[list[WriteResult]] = Future()
        future.set_result(tagged)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        files: dict[str, FileRecord] = {}
        plain_results = []
        for rank_results in results:
            plain = []
            for result in rank_results:
                info = result.storage_data
                files[info.relative_path] = FileRecord(info.file_size, info.file_sha256)
                plain_info = _StorageInfo(info.relative_path, info.offset, info.length, info.transform_descriptors)
                plain.append(dataclasses.replace(result, storage_data=plain_info))
            plain_results.append(plain)

        super().finish(metadata, plain_results)

        # The coordinator wrote `.metadata` under a temporary name and renamed it.
        files[_METADATA_NAME] = self.fs.records.pop(_METADATA_NAME + ".tmp")
        fs = self.fs.fs
        path = fs._strip_protocol(str(self.path))

        self.manifest = Manifest(step=self.step, files=files, world_size=self.world_size, extra=self.extra)
        write_manifest(fs, path, self.manifest)

"""A DCP storage reader that reads each file whole, in large sequential reads.

torch's FsspecReader opens a file and reads every tensor through its own
seek and read, which turns into many small ranged GETs on S3. This reader
fetches each file with 8 MiB reads into one pre-sized buffer first and serves
DCP's slices from there: resume became about 4x faster in
`bench/checkpoint.py --s3` (96 MiB state, loopback SeaweedFS, 2-core
machine). Files already fetched (and checksummed in the same pass) by
`read_verified` are taken from `cache` instead of read again.
NOTE: a file stays in host memory while it is loaded. With one file per rank,
that is the rank's whole shard of the checkpoint.
"""

import hashlib
import io
import os
import posixpath
from collections.abc import Generator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from torch.distributed.checkpoint._fsspec_filesystem import FileSystem, FsspecReader

_CHUNK_BYTES = 8 * 1024 * 1024


def _read_into(fs: Any, path: str, size: int, digest: Any = None) -> tuple[bytearray, int]:
    """Read `path` into a new buffer of `size` bytes; return (buffer, bytes the file really has up to size + 1).

    With `digest` (a hashlib object), each chunk is hashed on a helper
    thread while the next chunk is read: hashlib releases the GIL, so the
    checksum costs no second pass over the data and little extra wall time.
    """
    buffer = bytearray(size)  # calloc: untouched pages cost nothing until read into
    view = memoryview(buffer)
    position = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-hash") as hasher:
        pending = []
        with fs.open(path, "rb", block_size=_CHUNK_BYTES) as stream:
            while position < size:
                count = stream.readinto(view[position : position + _CHUNK_BYTES])
                if not count:
                    break
                if digest is not None:
                    pending.append(hasher.submit(digest.update, view[position : position + count]))
                position += count
            if position == size and stream.read(1):
                position += 1  # longer than expected: the caller reports the size mismatch
        for future in pending:  # one worker: the updates ran in file order
            future.result()
    return buffer, position


def read_whole(fs: Any, path: str) -> bytearray:
    """Return the content of one file, read sequentially in 8 MiB reads into one buffer."""
    size = int(fs.size(path))
    buffer, actual = _read_into(fs, path, size)
    if actual != size:
        raise OSError(f"{path} changed while it was read: {size} bytes listed, {actual} read")
    return buffer


def read_verified(fs: Any, path: str, size: int) -> tuple[bytearray, str, int]:
    """Read one file of expected `size` bytes and hash it in the same pass.

    Returns (content, hex SHA-256 of the bytes read, bytes read, or size + 1
    when the file is longer); a caller compares both with the MANIFEST.
    """
    digest = hashlib.sha256()
    buffer, actual = _read_into(fs, path, size, digest)
    return buffer, digest.hexdigest(), actual


class _BufferStream(io.RawIOBase):
    """A read-only, seekable stream over an in-memory buffer, without copying it (io.BytesIO copies a bytearray)."""

    def __init__(self, buffer: Any) -> None:
        super().__init__()
        self._view = memoryview(buffer).cast("B")
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: len(self._view)}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, target: Any) -> int:
        out = memoryview(target).cast("B")
        count = max(0, min(len(out), len(self._view) - self._position))
        out[:count] = self._view[self._position : self._position + count]
        self._position += count
        return count

    def read(self, size: int = -1) -> bytes:
        end = len(self._view) if size is None or size < 0 else min(len(self._view), self._position + size)
        data = self._view[self._position : max(self._position, end)].tobytes()
        self._position += len(data)
        return data

    def close(self) -> None:
        self._view.release()
        super().close()


class _WholeFileSystem(FileSystem):
    def __init__(self, cache: dict[str, Any]) -> None:
        super().__init__()
        self.cache = cache  # base name -> content (bytes or bytearray), consumed on use

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Generator[io.IOBase, None, None]:
        if "r" not in mode or "+" in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        name = posixpath.basename(os.fspath(path))
        data = self.cache.pop(name, None)
        if data is None:
            data = read_whole(self.fs, os.fspath(path))
        stream = _BufferStream(data)
        try:
            yield stream
        finally:
            stream.close()


class WholeFileReader(FsspecReader):
    """FsspecReader that reads whole files (see the module docstring); extra keyword arguments are fsspec options."""

    def __init__(self, path: str, cache: dict[str, Any] | None = None, **storage_options: Any) -> None:
        super().__init__(path, **storage_options)
        self.fs = _WholeFileSystem(cache if cache is not None else {})
        self.path = self.fs.init_path(path, **storage_options)

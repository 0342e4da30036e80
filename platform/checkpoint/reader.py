"""A DCP storage reader that reads each file whole, in large sequential reads.

torch's FsspecReader opens a file and reads every tensor through its own
seek and read, which turns into many small ranged GETs on S3. This reader
fetches each file with 8 MiB reads into memory first and serves DCP's slices
from there: resume became about 4x faster in `bench/checkpoint.py --s3`
(96 MiB state, loopback SeaweedFS, 2-core machine). Files already
fetched by the checksum pass are taken from `cache` instead of read again.
NOTE: a file stays in host memory while it is loaded. With one file per rank,
that is the rank's whole shard of the checkpoint.
"""

import io
import os
import posixpath
from collections.abc import Generator
from contextlib import contextmanager
from typing import Any

from torch.distributed.checkpoint._fsspec_filesystem import FileSystem, FsspecReader

_CHUNK_BYTES = 8 * 1024 * 1024


def read_whole(fs: Any, path: str) -> bytes:
    """Return the content of one file, read sequentially in 8 MiB reads."""
    buffer = io.BytesIO()
    with fs.open(path, "rb", block_size=_CHUNK_BYTES) as stream:
        while chunk := stream.read(_CHUNK_BYTES):
            buffer.write(chunk)
    return buffer.getvalue()


class _WholeFileSystem(FileSystem):
    def __init__(self, cache: dict[str, bytes]) -> None:
        super().__init__()
        self.cache = cache  # base name -> content, consumed on use

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
        yield io.BytesIO(data)


class WholeFileReader(FsspecReader):
    """FsspecReader that reads whole files (see the module docstring); extra keyword arguments are fsspec options."""

    def __init__(self, path: str, cache: dict[str, bytes] | None = None, **storage_options: Any) -> None:
        super().__init__(path, **storage_options)
        self.fs = _WholeFileSystem(cache if cache is not None else {})
        self.path = self.fs.init_path(path, **storage_options)

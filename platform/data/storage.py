"""Storage access for the data pipeline: fsspec filesystems, retried ranged reads.

Every URI goes through fsspec (`file://` or a bare path, `s3://` through s3fs,
`memory://`). For s3, endpoint, credentials and region come from the usual
environment variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_DEFAULT_REGION, AWS_ENDPOINT_URL or FSSPEC_S3_ENDPOINT_URL) and from the
config's `storage_options`, which win.

Retries live here and nowhere below: s3fs's and botocore's own retry loops are
switched off for the filesystems this module creates, so every retried request
is counted (the `retries` metric) and bounded by one budget.

`ShardReader` streams one object with read-ahead: it fetches `read_ahead_bytes`
per ranged request and keeps the next `read_ahead_blocks` blocks in flight on
background threads while the caller parses the current one. So download and
parsing overlap, and a shard is never downloaded whole before use.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, TypeVar

import fsspec

from bagel.platform.data.config import RetryConfig

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Substrings of errors worth retrying: throttling, 5xx, dropped connections.
_RETRYABLE_MARKERS = (
    "SlowDown",
    "reduce your request rate",
    "Throttl",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "503",
    "500",
    "502",
    "504",
    "Connection reset",
    "Connection aborted",
    "Server disconnected",
    "timed out",
    "Timeout",
)


class RetryStats:
    """Counts retried requests in this process (reported as the `retries` metric)."""

    def __init__(self) -> None:
        self.retries = 0


def is_retryable(error: BaseException) -> bool:
    """True for throttling, 5xx and transient network errors; False for missing/forbidden objects."""
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    if isinstance(error, OSError) and error.errno == errno.EBUSY:  # s3fs's translation of SlowDown
        return True
    text = f"{type(error).__name__}: {error}"
    return any(marker in text for marker in _RETRYABLE_MARKERS)


def call_with_retries(
    fn: Callable[[], T], what: str, retry: RetryConfig, stats: RetryStats | None = None, rng: random.Random | None = None
) -> T:
    """Call `fn`, retrying retryable errors with full-jitter exponential backoff within `retry`'s budget."""
    rng = rng or random.Random()
    start = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as error:  # classified below; non-retryable errors propagate unchanged
            elapsed = time.monotonic() - start
            if not is_retryable(error) or attempt >= retry.max_attempts or elapsed >= retry.budget_s:
                if is_retryable(error):
                    logger.warning("%s failed after %d attempts in %.1f s: %s", what, attempt, elapsed, error)
                raise
            cap = min(retry.max_backoff_s, retry.initial_backoff_s * 2 ** (attempt - 1))
            wait = min(rng.uniform(0, cap), max(0.0, retry.budget_s - elapsed))
            if stats is not None:
                stats.retries += 1
            logger.debug("%s: retry %d in %.3f s after %s", what, attempt, wait, error)
            time.sleep(wait)


def _protocol(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"


def filesystem_options(uri: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """fsspec arguments for `uri`: the config's options, plus s3 settings that hand retries to us."""
    options = dict(storage_options or {})
    if _protocol(uri) in ("s3", "s3a"):
        config_kwargs = dict(options.get("config_kwargs") or {})
        config_kwargs.setdefault("retries", {"total_max_attempts": 1, "mode": "standard"})
        options["config_kwargs"] = config_kwargs
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("FSSPEC_S3_ENDPOINT_URL")
        client_kwargs = dict(options.get("client_kwargs") or {})
        if endpoint and "endpoint_url" not in client_kwargs and "endpoint_url" not in options:
            client_kwargs["endpoint_url"] = endpoint
        options["client_kwargs"] = client_kwargs
    return options


def new_filesystem(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Create a fresh (uncached) filesystem for `uri` and return it with the path inside it.

    Fresh, because s3fs is not fork-safe: each DataLoader worker builds its own.
    """
    protocol = _protocol(uri)
    options = filesystem_options(uri, storage_options)
    cls = fsspec.get_filesystem_class(protocol)
    fs = cls(skip_instance_cache=True, **options)
    if protocol in ("s3", "s3a"):
        fs.retries = 1  # s3fs's own loop would retry (and hide) SlowDown responses
    path = cls._strip_protocol(uri)
    return fs, path


def join_uri(base_uri: str, relative: str) -> str:
    """Resolve a shard path from a manifest: absolute URIs stay, relative ones sit beside the manifest."""
    if "://" in relative or relative.startswith("/"):
        return relative
    return base_uri.rsplit("/", 1)[0] + "/" + relative


class FilesystemCache:
    """Filesystems of one process, keyed by protocol and options; rebuilt after a fork."""

    def __init__(self, storage_options: dict[str, Any] | None) -> None:
        self.storage_options = dict(storage_options or {})
        self._pid = os.getpid()
        self._cache: dict[str, fsspec.AbstractFileSystem] = {}

    def get(self, uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
        if os.getpid() != self._pid:
            self._cache.clear()
            self._pid = os.getpid()
        protocol = _protocol(uri)
        fs = self._cache.get(protocol)
        if fs is None:
            fs, path = new_filesystem(uri, self.storage_options)
            self._cache[protocol] = fs
        return fs, type(fs)._strip_protocol(uri)


class ShardReader:
    """A read-only, seekable, file-like view of one object, fetched in retried ranged reads.

    `size` is the object's length in bytes. Reads are served from the current
    block while up to `depth` following blocks are fetched by background
    threads (a bounded queue of requests in flight), so the download of the
    next blocks overlaps the caller's parsing of this one. At most
    `depth + 1` blocks are in memory, never the whole object. A seek outside
    the queued range drops the queue and restarts it at the new position.
    """

    _executor = None  # the prefetch threads of this process, created lazily (after any fork)
    _executor_pid = None
    # Enough for a default queue (2 blocks) of the current shard plus the next
    # shard's first block; the fetches of deeper queues wait for a free thread.
    _POOL_THREADS = 4

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        path: str,
        block_size: int,
        retry: RetryConfig,
        stats: RetryStats | None = None,
        size: int | None = None,
        depth: int = 2,
    ) -> None:
        self.fs, self.path, self.block_size, self.retry, self.stats = fs, path, max(4096, block_size), retry, stats
        self.depth = max(1, depth)
        self.size = size if size is not None else call_with_retries(lambda: fs.size(path), f"size of {path}", retry, stats)
        self._pos = 0
        self._block_start = 0
        self._block = b""
        self._ahead: deque[tuple[int, Future]] = deque()  # (block start, fetch) in byte order, contiguous

    @classmethod
    def pool(cls) -> ThreadPoolExecutor:
        """Return the prefetch threads of this process (shard opening uses them too)."""
        if cls._executor is None or cls._executor_pid != os.getpid():
            cls._executor = ThreadPoolExecutor(max_workers=cls._POOL_THREADS, thread_name_prefix="shard-prefetch")
            cls._executor_pid = os.getpid()
        return cls._executor

    def _fetch(self, start: int) -> bytes:
        end = min(self.size, start + self.block_size)
        if start >= end:
            return b""
        return call_with_retries(
            lambda: self.fs.cat_file(self.path, start=start, end=end), f"read {self.path}[{start}:{end}]", self.retry, self.stats
        )

    def _drop_queue(self) -> None:
        while self._ahead:
            self._ahead.popleft()[1].cancel()

    def _fill_queue(self, start: int, limit: int) -> None:
        """Queue fetches of the blocks from byte `start` on until `limit` are in flight."""
        following = self._ahead[-1][0] + self.block_size if self._ahead else start
        while len(self._ahead) < limit and following < self.size:
            self._ahead.append((following, self.pool().submit(self._fetch, following)))
            following += self.block_size

    def prefetch(self, start: int) -> None:
        """Request the block at byte `start` in the background (the next read there waits for it)."""
        if not self._ahead and start < self.size:
            self._fill_queue(start, 1)

    def _load_block(self, start: int) -> None:
        if self._ahead and self._ahead[0][0] != start:
            self._drop_queue()  # a seek away from the queued range (skipping samples on resume)
        if self._ahead:
            data = self._ahead.popleft()[1].result()
        else:
            data = self._fetch(start)
        self._block_start, self._block = start, data
        if data:
            self._fill_queue(start + len(data), self.depth)

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.size - self._pos
        offset = self._pos - self._block_start
        if 0 <= offset and offset + n <= len(self._block):  # the common case: inside the current block
            self._pos += n
            return self._block[offset : offset + n]
        out = []
        while n > 0 and self._pos < self.size:
            offset = self._pos - self._block_start
            if not (0 <= offset < len(self._block)):
                self._load_block(self._pos)
                offset = 0
                if not self._block:
                    break
            chunk = self._block[offset : offset + n]
            out.append(chunk)
            self._pos += len(chunk)
            n -= len(chunk)
        return b"".join(out)

    def read_at(self, position: int, n: int) -> bytes:
        """seek(position) then read(n) in one call; the tar parser's per-member read."""
        offset = position - self._block_start
        if 0 <= offset and offset + n <= len(self._block):  # inside the current block: one slice
            self._pos = position + n
            return self._block[offset : offset + n]
        self._pos = max(0, position)
        return self.read(n)

    def view_at(self, position: int, n: int) -> memoryview | bytes:
        """Like `read_at`, without a copy: a read-only memoryview of the current block when it holds the range.

        The view keeps that block alive as long as it lives (blocks are never
        modified, a new block is a new object). A range across blocks comes
        back as bytes.
        """
        offset = position - self._block_start
        if 0 <= offset and offset + n <= len(self._block):
            self._pos = position + n
            return memoryview(self._block)[offset : offset + n]
        self._pos = max(0, position)
        return self.read(n)

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 1:
            offset += self._pos
        elif whence == 2:
            offset += self.size
        self._pos = max(0, offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._drop_queue()
        self._block = b""

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""Storage access for the data pipeline: fsspec filesystems, retried ranged reads.

Every URI goes through fsspec (`file://` or a bare path, `s3://` through s3fs,
`memory://`). For s3, endpoint, credentials and region come from the usual
environment variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_DEFAULT_REGION, AWS_ENDPOINT_URL or FSSPEC_S3_ENDPOINT_URL) and from the
config's `storage_options`, which win (`bagel.platform.s3_endpoint` has the
full precedence rule for the endpoint).

Retries live here and nowhere below: s3fs's and botocore's own retry loops are
switched off for the filesystems this module creates, so every retried request
is counted (the `retries` metric) and bounded by one budget.

`ShardReader` streams one object with read-ahead: it fetches `read_ahead_bytes`
per ranged request and keeps the next `read_ahead_blocks` blocks in flight on
background threads while the caller parses the current one. So download and
parsing overlap, and a shard is never downloaded whole before use.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import sys
import time
import urllib.parse
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator, TypeVar

import fsspec

from bagel.platform.data.config import RetryConfig
from bagel.platform.exit_codes import UsageError
from bagel.platform.s3_endpoint import is_s3_uri, with_s3_endpoint

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


# Settings that choose the S3 endpoint, named in messages about an unreachable endpoint.
ENDPOINT_SETTINGS = "AWS_ENDPOINT_URL / FSSPEC_S3_ENDPOINT_URL or data.storage_options"


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
    if _is_botocore_network_error(error):  # refused or reset connections, read timeouts (not builtin subclasses)
        return True
    if isinstance(error, OSError) and error.errno == errno.EBUSY:  # s3fs's translation of SlowDown
        return True
    text = f"{type(error).__name__}: {error}"
    return any(marker in text for marker in _RETRYABLE_MARKERS)


def _botocore_exceptions():
    """Return botocore.exceptions if it is imported, else None (then no error can be one of its classes)."""
    return sys.modules.get("botocore.exceptions")


def _is_botocore_network_error(error: BaseException) -> bool:
    exceptions = _botocore_exceptions()
    return exceptions is not None and isinstance(error, (exceptions.ConnectionError, exceptions.HTTPClientError))


def unreachable_endpoint_message(error: BaseException) -> str | None:
    """Return a one-line description of a failed connection to an S3 endpoint in `error` or its causes, or None.

    The message names the endpoint (scheme and host of the request URL) and
    the settings that choose it.
    """
    exceptions = _botocore_exceptions()
    if exceptions is None:
        return None
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, exceptions.ConnectionError):
            request_url = getattr(current, "kwargs", {}).get("endpoint_url", "")
            parts = urllib.parse.urlsplit(request_url)
            endpoint = f"{parts.scheme}://{parts.netloc}" if parts.netloc else request_url or "(unknown)"
            return f"cannot connect to the S3 endpoint {endpoint} ({current}); check {ENDPOINT_SETTINGS}"
        current = current.__cause__ or current.__context__
    return None


@contextlib.contextmanager
def unreachable_endpoint_errors(prefix: str = "", error_class: type[UsageError] = UsageError) -> Iterator[None]:
    """Re-raise a failed connection to an S3 endpoint as `error_class` with `prefix` + a one-line message.

    UsageErrors (their messages already name the fix) and all other errors pass unchanged.
    """
    try:
        yield
    except UsageError:
        raise
    except Exception as error:
        message = unreachable_endpoint_message(error)
        if message is None:
            raise
        raise error_class(prefix + message) from error


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
    options = with_s3_endpoint(uri, storage_options)
    if is_s3_uri(uri):
        config_kwargs = dict(options.get("config_kwargs") or {})
        config_kwargs.setdefault("retries", {"total_max_attempts": 1, "mode": "standard"})
        options["config_kwargs"] = config_kwargs
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


class BucketNotFoundError(UsageError, FileNotFoundError):
    """The S3 bucket of a URI does not exist."""


def check_bucket(fs: fsspec.AbstractFileSystem, uri: str, retry: RetryConfig) -> None:
    """Raise BucketNotFoundError unless the bucket of the s3:// `uri` exists. Other URIs pass unchecked.

    Writers call this instead of `makedirs`, which on S3 creates a missing
    bucket, so a typo in a bucket name would create a new bucket. A
    connection failure that outlives the retries raises UsageError naming the
    endpoint. A bucket that exists but denies HeadBucket (403) passes: the
    writes that follow report their own permission errors.
    """
    if not is_s3_uri(uri):
        return
    bucket = type(fs)._strip_protocol(uri).split("/", 1)[0]
    try:
        with unreachable_endpoint_errors():
            call_with_retries(lambda: fs.call_s3("head_bucket", Bucket=bucket), f"check of bucket {bucket!r}", retry)
    except FileNotFoundError as error:
        endpoint = getattr(fs, "endpoint_url", None) or "AWS's default endpoint"
        raise BucketNotFoundError(
            f"S3 bucket {bucket!r} of {uri} does not exist at {endpoint}; "
            f"create it first (for example `aws s3 mb s3://{bucket}`) or fix the bucket name"
        ) from error
    except PermissionError:
        logger.debug("HeadBucket on %s is forbidden; assuming the bucket exists", bucket)


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

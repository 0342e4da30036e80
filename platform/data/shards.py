"""Training shards: POSIX tar files in the WebDataset convention, plus one manifest per dataset.

Why tar shards: a tar is a plain sequence of (512-byte header, data) records.
A shard therefore streams front to back with ranged reads and needs no index,
and any tool can list or unpack it. The WebDataset layout (members named
`KEY.EXT`, the members of one sample adjacent) is the common format for
streaming multimodal training data from object storage. Image bytes are stored
as they came (JPEG/PNG), never re-encoded; each sample's text and structure is
one JSON member (see `bagel.platform.data.records`).

Members of sample KEY: `KEY.json` first, then `KEY.0.jpg`, `KEY.1.png`, ... in
image order (the number is the image's index in the record's `images` list).

Manifest (`manifest.json` beside the shards):

    {"format": "bagel-shards/1", "name": "t2i", "kind": "t2i",
     "num_samples": 120, "num_bytes": 3932160,
     "shards": [{"uri": "shard-00000.tar", "num_samples": 15, "num_bytes": 491520,
                 "sha256": "..."}, ...]}

Shard URIs are relative to the manifest (or absolute), so a dataset directory
can be copied between storages unchanged. The manifest is written last: a
manifest that exists describes complete shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator
from zlib import adler32

from bagel.platform.data.config import RetryConfig
from bagel.platform.exit_codes import UsageError
from bagel.platform.data.storage import (
    BucketNotFoundError,
    RetryStats,
    ShardReader,
    call_with_retries,
    check_bucket,
    join_uri,
    new_filesystem,
    unreachable_endpoint_errors,
    unreachable_endpoint_message,
)
from bagel.platform.s3_endpoint import is_s3_uri

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "bagel-shards/1"
MANIFEST_NAME = "manifest.json"


class DataError(UsageError, ValueError):
    """Unusable input data (missing manifest, empty dataset, too many bad samples): retrying cannot help."""


@dataclass
class ShardInfo:
    """One shard as the manifest lists it."""

    uri: str  # as written in the manifest (relative to it, or absolute)
    num_samples: int
    num_bytes: int
    sha256: str


@dataclass
class Manifest:
    """A dataset's manifest; `uri` is where it was read from."""

    uri: str
    name: str
    kind: str  # "t2i" | "vlm" | "edit" | "interleaved" | "mixed"
    shards: list[ShardInfo]
    digest: str  # sha256 of the manifest file's bytes (identifies the data in config digests)

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def num_bytes(self) -> int:
        return sum(s.num_bytes for s in self.shards)

    def shard_uri(self, index: int) -> str:
        return join_uri(self.uri, self.shards[index].uri)


def manifest_uri(uri: str) -> str:
    """Return the manifest URI for a manifest URI or for the directory that contains manifest.json."""
    return uri if uri.endswith(".json") else uri.rstrip("/") + "/" + MANIFEST_NAME


# Subfolders checked for a manifest when a location contains none. It is enough
# for a folder of datasets, and few enough that a bucket root costs seconds, not minutes.
_MAX_FOLDERS_CHECKED = 64


def datasets_below(uri: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Return the URIs of the direct subfolders of `uri` that contain a manifest ([] when none or unreadable).

    Only the first 64 subfolders in listing order are checked.
    """
    base = uri.rstrip("/")
    fs, path = new_filesystem(base, storage_options)
    try:
        entries = fs.ls(path, detail=True)
    except Exception as error:  # the result only adds a hint to an error message, so unreadable means none
        logger.debug("cannot list %s: %s", base, error)
        return []
    found = []
    folders = [entry["name"].rstrip("/") for entry in entries if entry.get("type") == "directory"]
    for folder in folders[:_MAX_FOLDERS_CHECKED]:
        name = folder.rsplit("/", 1)[-1]
        try:
            if fs.exists(f"{folder}/{MANIFEST_NAME}"):
                found.append(f"{base}/{name}")
        except Exception as error:
            logger.debug("cannot check %s/%s: %s", folder, MANIFEST_NAME, error)
    return sorted(found)


def _missing_manifest_error(uri: str, fs: Any, storage_options: dict[str, Any] | None, retry: RetryConfig) -> DataError:
    """Explain a manifest that was not found: a missing bucket, datasets one level down, or nothing there."""
    try:
        check_bucket(fs, uri, retry)
    except BucketNotFoundError as error:
        return DataError(str(error))
    location = uri.rsplit("/", 1)[0]
    datasets = datasets_below(location, storage_options)
    if datasets:
        return DataError(
            f"dataset manifest {uri} does not exist, but {location} contains {len(datasets)} dataset(s): "
            f"{', '.join(datasets)}; use one of these URIs, for example `bagel data inspect {datasets[0]}`"
        )
    return DataError(f"dataset manifest {uri} does not exist; write it with `bagel data prepare` or `bagel data demo`")


def read_manifest(uri: str, storage_options: dict[str, Any] | None = None, retry: RetryConfig | None = None) -> Manifest:
    """Read and validate a manifest; a missing, unreachable or empty one raises DataError naming the URI.

    `uri` is the manifest or the folder that contains manifest.json.
    """
    uri = manifest_uri(uri)
    retry = retry or RetryConfig()
    fs, path = new_filesystem(uri, storage_options)
    try:
        raw = call_with_retries(lambda: fs.cat_file(path), f"read {uri}", retry)
    except FileNotFoundError as error:
        raise _missing_manifest_error(uri, fs, storage_options, retry) from error
    except PermissionError as error:
        raise DataError(f"dataset manifest {uri} is not readable with the given credentials: {error}") from error
    except Exception as error:  # storage errors that outlived the retries
        message = unreachable_endpoint_message(error) or f"{type(error).__name__}: {error}"
        raise DataError(f"cannot read dataset manifest {uri}: {message}") from error
    try:
        body = json.loads(raw)
    except ValueError as error:
        raise DataError(f"dataset manifest {uri} is not valid JSON: {error}") from error
    if not isinstance(body, dict) or body.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{uri} is not a {MANIFEST_FORMAT} manifest (format={body.get('format') if isinstance(body, dict) else None!r})")
    shards = [ShardInfo(s["uri"], int(s["num_samples"]), int(s["num_bytes"]), s.get("sha256", "")) for s in body.get("shards", [])]
    manifest = Manifest(uri, body.get("name", ""), body.get("kind", ""), shards, hashlib.sha256(raw).hexdigest())
    if manifest.num_samples == 0:
        raise DataError(f"dataset manifest {uri} lists no samples ({len(shards)} shards); prepare the dataset again")
    return manifest


class ShardWriter:
    """Writes samples into tar shards under `dest` and the manifest last.

    A shard is closed when it contains `max_samples` samples or `max_bytes` bytes.
    Shards are built in memory and uploaded whole (one PUT per shard, retried
    within `retry`'s budget like reads). On S3 the bucket must exist: the
    writer never creates one and raises BucketNotFoundError (a UsageError).
    """

    def __init__(
        self,
        dest: str,
        name: str,
        kind: str,
        max_samples: int = 1000,
        max_bytes: int = 64 * 2**20,
        storage_options: dict[str, Any] | None = None,
        retry: RetryConfig | None = None,
    ) -> None:
        self.dest = dest.rstrip("/")
        self.name, self.kind = name, kind
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.retry = retry or RetryConfig()
        self.fs, self.root = new_filesystem(self.dest, storage_options)
        if is_s3_uri(self.dest):
            # Object stores have no folders to create, and s3fs's makedirs would create a missing bucket.
            check_bucket(self.fs, self.dest, self.retry)
        else:
            self.fs.makedirs(self.root, exist_ok=True)
        self.shards: list[ShardInfo] = []
        self._buffer: io.BytesIO | None = None
        self._tar: tarfile.TarFile | None = None
        self._count = 0
        self._keys: set[str] = set()

    def _open(self) -> None:
        self._buffer = io.BytesIO()
        self._tar = tarfile.open(fileobj=self._buffer, mode="w", format=tarfile.USTAR_FORMAT)
        self._count = 0

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0  # reproducible shards: same input, same bytes, same checksum
        info.mode = 0o644
        self._tar.addfile(info, io.BytesIO(data))

    def write(self, key: str, record: dict, images: list[tuple[bytes, str]]) -> None:
        """Add one sample: its JSON record and its encoded images as (bytes, extension)."""
        if "." in key or "/" in key or not key:
            raise ValueError(f"sample key {key!r} must be non-empty without '.' or '/'")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r} in dataset {self.name}")
        self._keys.add(key)
        if self._tar is None:
            self._open()
        self._add(f"{key}.json", json.dumps(record, ensure_ascii=False, sort_keys=True).encode("utf-8"))
        for index, (data, ext) in enumerate(images):
            self._add(f"{key}.{index}.{ext.lstrip('.').lower()}", data)
        self._count += 1
        if self._count >= self.max_samples or self._buffer.tell() >= self.max_bytes:
            self._flush()

    def _flush(self) -> None:
        if self._tar is None or self._count == 0:
            return
        self._tar.close()
        data = self._buffer.getvalue()
        shard_name = f"shard-{len(self.shards):05d}.tar"
        self._put(f"{self.root}/{shard_name}", data)
        self.shards.append(ShardInfo(shard_name, self._count, len(data), hashlib.sha256(data).hexdigest()))
        self._tar, self._buffer, self._count = None, None, 0

    def close(self) -> str:
        """Flush the last shard, write the manifest, return its URI."""
        self._flush()
        body = {
            "format": MANIFEST_FORMAT,
            "name": self.name,
            "kind": self.kind,
            "num_samples": sum(s.num_samples for s in self.shards),
            "num_bytes": sum(s.num_bytes for s in self.shards),
            "created_unix": int(time.time()),
            "shards": [s.__dict__ for s in self.shards],
        }
        self._put(f"{self.root}/{MANIFEST_NAME}", json.dumps(body, indent=1).encode("utf-8"))
        return f"{self.dest}/{MANIFEST_NAME}"

    def _put(self, path: str, data: bytes) -> None:
        with unreachable_endpoint_errors(f"cannot write {path}: ", DataError):
            call_with_retries(lambda: self.fs.pipe_file(path, data), f"write {path}", self.retry)


@dataclass
class RawRecord:
    """One sample as stored: its key, the parsed JSON record and its image bytes by index."""

    key: str
    record: dict
    images: dict[int, bytes | memoryview]  # encoded image by index; a view into the read block, not a copy
    bad_reason: str = ""  # set when the members could not be parsed (the record is then unusable)


def _octal(field: bytes) -> int:
    field = field.rstrip(b"\0 ").lstrip(b" ")
    if field and field[0] & 0x80:  # GNU base-256 for large sizes
        return int.from_bytes(field[1:], "big")
    return int(field or b"0", 8)


_END_OF_ARCHIVE = bytes(512)
_FILE_KINDS = (b"0", b"\0", b"7")  # regular file types; others (directories, links) carry no sample data


def _header_fields(header: bytes, offset: int) -> tuple[int, bytes]:
    """(data size in bytes, type flag) of the 512-byte tar header at byte `offset`, its checksum verified.

    The checksum is the sum of the header's bytes with its own field (148:156)
    counted as 8 spaces. The sum is computed in C: the low 16 bits of an
    Adler-32 are 1 + the byte sum modulo 65521, which is the exact sum for
    pieces of at most 256 bytes (256 * 255 < 65521). A wrong checksum raises
    tarfile.ReadError (a corrupt or truncated shard).
    """
    field = header[148:156]
    try:
        stored = int(field.rstrip(b"\0 ") or b"0", 8)
    except ValueError:  # not plain octal: base-256 or garbage, as _octal reads it
        stored = _octal(field)
    view = memoryview(header)
    computed = (adler32(view[0:148]) & 0xFFFF) + (adler32(view[156:356]) & 0xFFFF) + (adler32(view[356:512]) & 0xFFFF) + 253
    if stored != computed:
        raise tarfile.ReadError(f"bad tar header checksum at byte {offset}")
    field = header[124:136]
    try:
        size = int(field.rstrip(b"\0 ") or b"0", 8)
    except ValueError:  # GNU base-256 for large sizes
        size = _octal(field)
    return size, header[156:157]


_NO_PREFIX = bytes(155)
_decode_json = json.JSONDecoder().decode  # json.loads's decoder: no hooks, default options


def _member_name(header: bytes) -> str:
    """Decode the member name of a ustar (or v7) header, with its ustar prefix when present."""
    name = header[0:100].rstrip(b"\0").decode("utf-8")
    if header[345:500] != _NO_PREFIX and header[257:262] == b"ustar":  # an all-NUL prefix is no prefix
        return header[345:500].rstrip(b"\0").decode("utf-8") + "/" + name
    return name


def _extended_name(kind: bytes, data: bytes, current: str) -> str:
    """Return the next member's name from a GNU long-name ('L') or pax ('x') extension header, else `current`."""
    if kind == b"L":
        return data.rstrip(b"\0").decode("utf-8")
    for line in data.decode("utf-8").splitlines():
        _, _, record = line.partition(" ")
        if record.startswith("path="):
            current = record[5:]
    return current


def _reader_at(reader) -> Callable[[int, int], bytes]:
    """A function (position, size) -> bytes over `reader`: ShardReader's `read_at`, or seek + read for other files."""
    read_at = getattr(reader, "read_at", None)
    if read_at is not None:
        return read_at

    def seek_read(position: int, size: int) -> bytes:
        reader.seek(position)
        return reader.read(size)

    return seek_read


def iter_members(reader) -> Iterator[tuple[str, int, int]]:
    """(name, size, data offset) of each regular file in a tar stream, reading headers only.

    Handles ustar, GNU long names ('L') and pax 'path' records. A header with a
    wrong checksum, or a stream that ends inside a header, raises
    tarfile.ReadError (a truncated or corrupt shard). `iter_shard` inlines
    this loop (it runs once per member on the loader's main thread).
    """
    read_at = _reader_at(reader)
    offset = 0
    long_name = ""
    while True:
        header = read_at(offset, 512)
        if len(header) < 512:
            if not header:
                return
            raise tarfile.ReadError(f"unexpected end of data in a tar header at byte {offset}")
        if header == _END_OF_ARCHIVE:
            return
        size, kind = _header_fields(header, offset)
        data_offset = offset + 512
        offset = data_offset + (size + 511) // 512 * 512
        if kind in (b"L", b"x"):
            data = read_at(data_offset, size)
            if len(data) < size:
                raise tarfile.ReadError(f"unexpected end of data in a tar extension header at byte {data_offset}")
            long_name = _extended_name(kind, data, long_name)
            continue
        name = long_name or _member_name(header)
        long_name = ""
        if kind in _FILE_KINDS:
            yield name, size, data_offset


def iter_shard(reader: ShardReader, skip: int = 0) -> Iterator[RawRecord]:
    """Yield the samples of a tar shard in order, after skipping the first `skip` samples.

    Skipped samples' data is seeked over, not read. A truncated shard raises
    tarfile.ReadError from the point where it breaks.

    This loop runs once per tar member on the thread that also drives the
    storage client, so it is `iter_members` inlined: per member one header
    slice and one payload slice of the current read-ahead block (`read_at`),
    one header check. Image payloads are memoryviews of that block, not
    copies. Records in a shuffle window are read contiguously, so the blocks
    their views keep alive span the window's bytes plus the partial blocks at
    its two ends.
    """
    read_at = _reader_at(reader)
    view_at = getattr(reader, "view_at", read_at)
    current_key = None
    record_bytes: bytes | None = None
    images: dict[int, bytes | memoryview] = {}
    seen = 0
    offset = 0
    long_name = ""

    def finish() -> RawRecord:
        if record_bytes is None:
            return RawRecord(current_key, {}, images, "missing_field")
        try:
            if record_bytes[:1] == b"{" and record_bytes[1:2] != b"\0":
                # What json.loads does for these bytes (json.detect_encoding: UTF-8), minus its encoding detection.
                record = _decode_json(record_bytes.decode("utf-8", "surrogatepass"))
            else:
                record = json.loads(record_bytes)
            if not isinstance(record, dict):
                raise ValueError("record is not a JSON object")
        except ValueError:
            return RawRecord(current_key, {}, images, "bad_record")
        return RawRecord(current_key, record, images)

    while True:
        header = read_at(offset, 512)
        if len(header) < 512:
            if not header:
                break
            raise tarfile.ReadError(f"unexpected end of data in a tar header at byte {offset}")
        if header == _END_OF_ARCHIVE:
            break
        size, kind = _header_fields(header, offset)
        data_offset = offset + 512
        offset = data_offset + (size + 511) // 512 * 512
        if kind not in _FILE_KINDS:
            if kind in (b"L", b"x"):
                data = read_at(data_offset, size)
                if len(data) < size:
                    raise tarfile.ReadError(f"unexpected end of data in a tar extension header at byte {data_offset}")
                long_name = _extended_name(kind, data, long_name)
            else:
                long_name = ""
            continue
        if long_name:
            name, long_name = long_name, ""
        elif header[345:500] == _NO_PREFIX:  # the common case, inlined from _member_name
            name = header[0:100].rstrip(b"\0").decode("utf-8")
        else:
            name = _member_name(header)
        key, _, ext = name.rpartition("/")[2].partition(".")
        if key != current_key:
            if current_key is not None:
                if seen >= skip:
                    yield finish()
                seen += 1
            current_key, record_bytes, images = key, None, {}
        if seen < skip:
            continue
        if ext == "json":
            data = read_at(data_offset, size)
            record_bytes = data
        else:
            data = view_at(data_offset, size)
            index, _, _ = ext.partition(".")
            if index.isdigit():
                images[int(index)] = data
        if len(data) != size:
            raise tarfile.ReadError(f"unexpected end of data in {name}")
    if current_key is not None and seen >= skip:
        yield finish()

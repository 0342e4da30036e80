"""fsspec access to checkpoint storage (`file://`, plain local paths and `s3://`).

Every URI handed around keeps its protocol (`s3://bucket/key`, `file:///abs`);
`open_fs` turns one into a filesystem and the protocol-less path fsspec wants.
The S3 endpoint follows the same precedence as data storage:
`storage_options`, then AWS_ENDPOINT_URL, then FSSPEC_S3_ENDPOINT_URL
(`bagel.platform.s3_endpoint`).
"""

import hashlib
import json
import posixpath
from typing import Any

from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs

from bagel.platform.s3_endpoint import with_s3_endpoint

# Read size for checksums: large enough that S3 round trips do not dominate.
_CHUNK_BYTES = 8 * 1024 * 1024


def open_fs(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[AbstractFileSystem, str]:
    """Return (filesystem, path inside it) for `uri`."""
    return url_to_fs(uri, **with_s3_endpoint(uri, storage_options))


def join(uri: str, *names: str) -> str:
    """Join path parts onto a URI with `/` (fsspec paths are always `/`-separated)."""
    return posixpath.join(uri.rstrip("/"), *names)


def is_remote(uri: str) -> bool:
    """Return True for object stores, where files appear whole on close and fsync means nothing."""
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    return protocol not in ("file", "local")


def sha256_file(fs: AbstractFileSystem, path: str) -> str:
    """Return the hex SHA-256 of one file, streamed in 8 MiB reads."""
    digest = hashlib.sha256()
    with fs.open(path, "rb", block_size=_CHUNK_BYTES) as stream:
        while chunk := stream.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def list_sizes(fs: AbstractFileSystem, path: str) -> dict[str, int]:
    """Return {file name: size in bytes} for the files directly under `path` ({} when it does not exist)."""
    try:
        entries = fs.ls(path, detail=True, refresh=True)
    except FileNotFoundError:
        return {}
    sizes = {}
    for entry in entries:
        if entry.get("type") == "directory":
            continue
        sizes[posixpath.basename(entry["name"].rstrip("/"))] = int(entry["size"])
    return sizes


def list_dirs(fs: AbstractFileSystem, path: str) -> list[str]:
    """Return the names of the sub-directories of `path` ([] when it does not exist)."""
    try:
        entries = fs.ls(path, detail=True, refresh=True)
    except FileNotFoundError:
        return []
    return [posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "directory"]


def write_json(fs: AbstractFileSystem, path: str, payload: dict) -> bytes:
    """Write `payload` as indented JSON and return the bytes written."""
    data = (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode()
    with fs.open(path, "wb") as stream:
        stream.write(data)
    return data


def read_json(fs: AbstractFileSystem, path: str) -> dict:
    with fs.open(path, "rb") as stream:
        return json.loads(stream.read())


def remove_tree(fs: AbstractFileSystem, path: str) -> None:
    """Delete `path` and everything under it; a missing path is not an error."""
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


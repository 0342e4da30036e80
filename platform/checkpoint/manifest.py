"""The MANIFEST file: the commit record of a checkpoint.

A checkpoint directory is complete only when its MANIFEST exists. The writer
creates it after every other file (the DCP shards and `.metadata`), so a
directory without it is an interrupted save. The MANIFEST lists each file with
its size and SHA-256: a size check (one listing) catches a truncated or
missing file, and the checksum check catches a corrupted one.
"""

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from fsspec import AbstractFileSystem

from bagel.platform.checkpoint import storage

logger = logging.getLogger(__name__)

MANIFEST_NAME = "MANIFEST"
FORMAT_VERSION = 1


@dataclass
class FileRecord:
    size: int  # bytes
    sha256: str  # hex digest of the whole file


@dataclass
class Manifest:
    step: int
    files: dict[str, FileRecord]  # name relative to the checkpoint directory -> record
    world_size: int  # ranks that wrote the checkpoint
    created_unix: float = field(default_factory=time.time)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. tokens seen, parallel layout, config digest

    @property
    def total_bytes(self) -> int:
        return sum(record.size for record in self.files.values())

    def to_json(self) -> dict:
        return {
            "format": FORMAT_VERSION,
            "step": self.step,
            "world_size": self.world_size,
            "created_unix": self.created_unix,
            "extra": self.extra,
            "files": {name: {"size": r.size, "sha256": r.sha256} for name, r in sorted(self.files.items())},
        }

    @classmethod
    def from_json(cls, payload: dict) -> "Manifest":
        if payload.get("format") != FORMAT_VERSION:
            raise ValueError(f"unsupported MANIFEST format {payload.get('format')!r}: this version reads format {FORMAT_VERSION}")
        return cls(
            step=int(payload["step"]),
            world_size=int(payload["world_size"]),
            created_unix=float(payload["created_unix"]),
            extra=dict(payload.get("extra", {})),
            files={name: FileRecord(int(r["size"]), str(r["sha256"])) for name, r in payload["files"].items()},
        )


def write_manifest(fs: AbstractFileSystem, directory: str, manifest: Manifest) -> None:
    """Write MANIFEST into `directory`; call it only after every listed file is closed."""
    storage.write_json(fs, storage.join(directory, MANIFEST_NAME), manifest.to_json())


def read_manifest(fs: AbstractFileSystem, directory: str) -> Manifest | None:
    """Return the MANIFEST of `directory`, or None when it is absent (an incomplete checkpoint)."""
    path = storage.join(directory, MANIFEST_NAME)
    try:
        payload = storage.read_json(fs, path)
    except FileNotFoundError:
        return None
    return Manifest.from_json(payload)


def check_sizes(fs: AbstractFileSystem, directory: str, manifest: Manifest) -> list[str]:
    """Return one problem per missing or wrongly sized file ([] when all match)."""
    actual = storage.list_sizes(fs, directory)
    problems = []
    for name, record in sorted(manifest.files.items()):
        if name not in actual:
            problems.append(f"{name} is missing")
        elif actual[name] != record.size:
            problems.append(f"{name} has {actual[name]} bytes, the manifest records {record.size}")
    return problems


def check_checksums(
    fs: AbstractFileSystem, directory: str, manifest: Manifest, names: list[str], keep: dict[str, Any] | None = None
) -> list[str]:
    """Hash the files `names` and return one problem per SHA-256 (or size) mismatch.

    With `keep`, each file is read whole into memory and hashed in the same
    pass (`reader.read_verified`), and its content is stored there (by name)
    when it matches, so the following load reads nothing again.
    """
    problems = []
    for name in names:
        path = storage.join(directory, name)
        record = manifest.files[name]
        if keep is None:
            actual = storage.sha256_file(fs, path)
        else:
            from bagel.platform.checkpoint.reader import read_verified

            data, actual, read = read_verified(fs, path, record.size)
            if read != record.size:
                problems.append(f"{name} has {read if read <= record.size else 'more than ' + str(record.size)} bytes, "
                                f"the manifest records {record.size}")
                continue
        if actual != record.sha256:
            problems.append(f"{name} has SHA-256 {actual[:16]}..., the manifest records {record.sha256[:16]}...")
        elif keep is not None:
            keep[name] = data
    return problems

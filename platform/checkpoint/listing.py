"""Find checkpoints under a URI and classify each as complete or not, without loading anything."""

import logging
import re
from dataclasses import dataclass, field
from typing import Any

from bagel.platform.checkpoint import storage
from bagel.platform.checkpoint.manifest import Manifest, check_sizes, read_manifest

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir_name(step: int) -> str:
    """Return the directory name of the checkpoint after `step` optimizer steps."""
    return f"step-{step:08d}"


@dataclass
class CheckpointEntry:
    uri: str
    step: int
    size_bytes: int  # bytes on storage (all files, listed or not)
    manifest: Manifest | None  # None: no MANIFEST, the save never committed
    problems: list[str] = field(default_factory=list)  # why a committed checkpoint is unusable

    @property
    def complete(self) -> bool:
        return self.manifest is not None and not self.problems

    @property
    def status(self) -> str:
        if self.manifest is None:
            return "incomplete (no MANIFEST)"
        if self.problems:
            return "damaged: " + "; ".join(self.problems)
        return "complete"


def inspect_checkpoint(uri: str, storage_options: dict[str, Any] | None = None, step: int | None = None) -> CheckpointEntry:
    """Read the MANIFEST of one checkpoint directory and compare it with the listed file sizes."""
    fs, path = storage.open_fs(uri, storage_options)
    sizes = storage.list_sizes(fs, path)
    try:
        manifest = read_manifest(fs, path)
    except (ValueError, KeyError) as error:
        return CheckpointEntry(uri, step if step is not None else -1, sum(sizes.values()), None, [f"unreadable MANIFEST: {error}"])
    problems = check_sizes(fs, path, manifest) if manifest is not None else []
    if step is None:
        step = manifest.step if manifest is not None else -1
    return CheckpointEntry(uri, step, sum(sizes.values()), manifest, problems)


def scan_checkpoints(checkpoints_uri: str, storage_options: dict[str, Any] | None = None) -> list[CheckpointEntry]:
    """Return every `step-N` checkpoint directly under `checkpoints_uri`, newest first."""
    fs, path = storage.open_fs(checkpoints_uri, storage_options)
    entries = []
    for name in storage.list_dirs(fs, path):
        match = _STEP_DIR.match(name)
        if match is None:
            continue
        entry = inspect_checkpoint(storage.join(checkpoints_uri, name), storage_options, step=int(match.group(1)))
        # Object stores with real directories (SeaweedFS) may keep an emptied
        # prefix after a delete; it holds nothing to load or purge.
        if entry.manifest is None and entry.size_bytes == 0 and not entry.problems:
            continue
        entries.append(entry)
    entries.sort(key=lambda entry: entry.step, reverse=True)
    return entries


def find_checkpoints(uri: str, storage_options: dict[str, Any] | None = None, max_depth: int = 5) -> list[CheckpointEntry]:
    """Return the checkpoints at or below `uri`: a checkpoint directory, a `checkpoints/` folder,
    a run's stage folder, a storage root (every run and promoted checkpoint), or `promoted/`."""
    fs, path = storage.open_fs(uri, storage_options)
    sizes = storage.list_sizes(fs, path)
    if "MANIFEST" in sizes or ".metadata" in sizes:
        return [inspect_checkpoint(uri, storage_options)]
    subdirs = storage.list_dirs(fs, path)
    if any(_STEP_DIR.match(name) for name in subdirs):
        return scan_checkpoints(uri, storage_options)
    if max_depth == 0:
        return []
    entries = []
    for name in sorted(subdirs):
        if name.startswith("."):
            continue
        entries.extend(find_checkpoints(storage.join(uri, name), storage_options, max_depth - 1))
    return entries

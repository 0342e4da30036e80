"""The `checkpoint:` section of a stage config."""

from dataclasses import dataclass, field
from typing import Any


@dataclass
class CheckpointConfig:
    """When and how training checkpoints are written, kept and verified."""

    enable: bool = True
    """Save training checkpoints. With False the run still resumes from existing ones."""

    interval_steps: int = 500
    """Save every this many optimizer steps; 0 disables step-based saves."""

    interval_seconds: float = 0.0
    """Also save when this many wall-clock seconds have passed since the last save; 0 disables it."""

    keep_latest: int = 3
    """Number of complete checkpoints to keep (older ones are deleted after a newer one commits); 0 keeps all."""

    async_save: bool = True
    """Write in a background thread; the training loop blocks only while state is copied to host memory."""

    reuse_staging_buffers: bool = True
    """Asynchronous saves copy the state into host buffers kept from one save to the next (pinned on CUDA),
    so later saves block the loop only for the copy. Costs one host copy of the rank's state between saves."""

    save_final: bool = True
    """Save after the last step even when it is not on the interval."""

    verify_checksums: bool = True
    """On resume, read every file of the chosen checkpoint and compare its SHA-256 with the manifest.
    The ranks split the files, so each reads about 1/world_size of the checkpoint."""

    io_threads: int = 1
    """Writer threads per rank (DCP `thread_count`); each writes its own file."""

    storage_options: dict[str, Any] = field(default_factory=dict)
    """Extra fsspec options for the storage URI (e.g. `client_kwargs.endpoint_url` for s3fs).
    Empty: fsspec reads credentials and endpoint from the environment."""

    def __post_init__(self) -> None:
        if self.interval_steps < 0:
            raise ValueError(f"checkpoint.interval_steps={self.interval_steps} is invalid: use 0 (off) or a positive step count")
        if self.interval_seconds < 0:
            raise ValueError(f"checkpoint.interval_seconds={self.interval_seconds} is invalid: use 0 (off) or a positive number of seconds")
        if self.keep_latest < 0:
            raise ValueError(f"checkpoint.keep_latest={self.keep_latest} is invalid: use 0 (keep all) or a positive count")
        if self.io_threads < 1:
            raise ValueError(f"checkpoint.io_threads={self.io_threads} is invalid: use 1 or more")

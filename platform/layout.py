"""Where a run keeps its files in storage (a `file://` or `s3://` URI root).

    {storage}/runs/{run}/{stage}/checkpoints/step-00001000/   training checkpoints
    {storage}/runs/{run}/{stage}/tensorboard/                  event files
    {storage}/runs/{run}/{stage}/summary.json                  written when the stage ends
    {storage}/promoted/{digest}/                               immutable promoted checkpoints

Every component (trainer, checkpointer, launcher, pipeline) derives paths
from here, so a resubmitted job finds what the previous attempt wrote.
"""

import re
from dataclasses import dataclass
from pathlib import Path

STAGES = ("alignment", "pretrain", "continued", "sft")

# `bagel run --local` keeps its data, runs and promoted checkpoints under this
# work directory (relative to the current directory) unless --workdir is given.
DEFAULT_WORKDIR = "bagel-work"
# Environment variable naming the default storage root for commands that take --storage.
DEFAULT_STORAGE_ENV = "BAGEL_STORAGE"


def default_storage(workdir: str = DEFAULT_WORKDIR) -> str:
    """Return the file:// storage root inside a local work directory."""
    return (Path(workdir).resolve() / "storage").as_uri()
_RUN_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def validate_run_name(run: str) -> str:
    """Return `run` if it is a DNS-1123 label (it names Kubernetes objects too), else raise ValueError."""
    if not _RUN_NAME.match(run):
        raise ValueError(
            f"invalid run name {run!r}: use lower-case letters, digits and '-', "
            "start and end with a letter or digit, at most 63 characters"
        )
    return run


def validate_stage(stage: str) -> str:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}: expected one of {', '.join(STAGES)}")
    return stage


@dataclass(frozen=True)
class StageLayout:
    storage: str  # URI root without trailing slash, e.g. s3://bucket/bagel or file:///data/bagel
    run: str
    stage: str

    def __post_init__(self) -> None:
        validate_run_name(self.run)
        validate_stage(self.stage)
        object.__setattr__(self, "storage", self.storage.rstrip("/"))

    @property
    def stage_dir(self) -> str:
        return f"{self.storage}/runs/{self.run}/{self.stage}"

    @property
    def checkpoints_dir(self) -> str:
        return f"{self.stage_dir}/checkpoints"

    @property
    def tensorboard_dir(self) -> str:
        return f"{self.stage_dir}/tensorboard"

    @property
    def summary_uri(self) -> str:
        return f"{self.stage_dir}/summary.json"


def promoted_dir(storage: str, digest: str) -> str:
    """Return the URI of the promoted checkpoint with content digest `digest`."""
    return f"{storage.rstrip('/')}/promoted/{digest}"

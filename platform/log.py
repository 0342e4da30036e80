"""Rank-aware logging for every process of a run.

Rank 0 logs at the requested level; other ranks log warnings and errors only,
each line prefixed with its rank, so a straggler's warning is attributable and
the console is not flooded by N copies of the progress line.
"""

import logging
import os
import sys

_FORMAT = "%(asctime)s %(rank_prefix)s%(levelname)s %(name)s: %(message)s"
# Storage client libraries that log routine steps at INFO (aiobotocore logs
# "Found credentials in environment variables." for every new client). They
# log at WARNING and above unless the requested level is DEBUG.
QUIET_LOGGERS = ("aiobotocore", "botocore", "boto3", "s3fs")


class _RankFilter(logging.Filter):
    def __init__(self, rank: int, world_size: int) -> None:
        super().__init__()
        self.prefix = f"[rank{rank}] " if world_size > 1 else ""

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank_prefix = self.prefix
        return True


def process_rank() -> tuple[int, int]:
    """Return (rank, world_size) from the torchrun environment; (0, 1) for a plain process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def setup_logging(level: str = "INFO") -> None:
    """Configure the root logger once per process; later calls only change the level."""
    rank, world_size = process_rank()
    numeric_level = logging.getLevelName(level.upper())
    if not isinstance(numeric_level, int):
        raise ValueError(f"invalid log level {level!r}: use DEBUG, INFO, WARNING or ERROR")
    if rank != 0:
        numeric_level = max(numeric_level, logging.WARNING)

    root = logging.getLogger()
    root.setLevel(numeric_level)
    for name in QUIET_LOGGERS:
        # NOTSET hands the level back to the root logger, so DEBUG shows everything.
        logging.getLogger(name).setLevel(logging.NOTSET if numeric_level <= logging.DEBUG else logging.WARNING)
    if any(getattr(handler, "_bagel", False) for handler in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler._bagel = True  # type: ignore[attr-defined]  # marks our handler for idempotence
    handler.addFilter(_RankFilter(rank, world_size))
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    root.addHandler(handler)

"""Goodput: the share of a stage's wall time that produced training progress which survived.

Time is lost to
- restarts: process start to the first training step of each attempt (imports,
  process-group setup, checkpoint load);
- checkpoint stalls: the time the loop blocks in `save` (staging, or the whole
  write when saving synchronously) and waiting for a previous save;
- lost work: steps an attempt ran after the checkpoint the next attempt resumed
  from, measured as wall time from that checkpoint's save to the attempt's last
  heartbeat.

Each attempt keeps a ledger `{stage_dir}/goodput/attempt-{start_ms}.json`,
written by rank 0 at every save, every `heartbeat_seconds` and at exit. After
a SIGKILL the ledger is at most `heartbeat_seconds` old, so lost work is
under-counted by at most that much.
"""

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from bagel.platform.checkpoint import storage
from bagel.platform.layout import StageLayout

logger = logging.getLogger(__name__)


@dataclass
class AttemptLedger:
    start_unix: float  # process start of this attempt
    resumed_step: int = 0  # step the attempt started from
    first_step_unix: float | None = None  # when the first training step began
    last_step: int = 0  # last completed step
    last_heartbeat_unix: float | None = None
    checkpoint_stall_s: float = 0.0
    saves: list[list[float]] = field(default_factory=list)  # [step, unix time of the save call]
    lost_work_s: float = 0.0  # work of earlier attempts discarded when this one resumed
    end_unix: float | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> "AttemptLedger":
        return cls(**{k: v for k, v in payload.items() if k in cls.__dataclass_fields__})


class GoodputTracker:
    """Record this attempt's restart time, checkpoint stalls and progress; account earlier attempts at resume.

    Call `resumed(step)` after loading, `step_started()` before the first step,
    `heartbeat(step)` after each step, `add_checkpoint_stall(s)` around saves
    (the CheckpointManager does this), and `finish()` at exit.
    """

    def __init__(
        self,
        layout: StageLayout,
        *,
        rank: int = 0,
        storage_options: dict[str, Any] | None = None,
        heartbeat_seconds: float = 30.0,
        start_unix: float | None = None,
    ) -> None:
        self.layout = layout
        self.rank = rank
        self.heartbeat_seconds = heartbeat_seconds
        self.ledger = AttemptLedger(start_unix=start_unix if start_unix is not None else process_start_unix())
        self._fs, self._dir = storage.open_fs(storage.join(layout.stage_dir, "goodput"), storage_options)
        self._path = storage.join(self._dir, f"attempt-{int(self.ledger.start_unix * 1000)}.json")
        self._previous: list[AttemptLedger] = []
        self._last_write = 0.0

    def resumed(self, step: int) -> None:
        """Account the work that earlier attempts did after `step`, which this attempt will redo."""
        self.ledger.resumed_step = step
        self._previous = self._read_previous()
        # Each attempt accounts only its direct predecessor, the newest earlier
        # ledger; older attempts were accounted by their own successors.
        lost = 0.0
        if self._previous:
            newest = max(self._previous, key=lambda attempt: attempt.start_unix)
            lost = self._lost_in(newest, step)
        self.ledger.lost_work_s = lost
        if lost:
            logger.info("goodput: %.1f s of earlier work after step %d is lost and will be redone", lost, step)

    def step_started(self) -> None:
        if self.ledger.first_step_unix is None:
            self.ledger.first_step_unix = time.time()
            self._write()

    def heartbeat(self, step: int) -> None:
        self.ledger.last_step = step
        self.ledger.last_heartbeat_unix = time.time()
        if time.monotonic() - self._last_write >= self.heartbeat_seconds:
            self._write()

    def add_checkpoint_stall(self, seconds: float) -> None:
        self.ledger.checkpoint_stall_s += seconds

    def saved(self, step: int) -> None:
        self.ledger.saves.append([step, time.time()])
        self._write()

    def finish(self) -> None:
        self.ledger.end_unix = time.time()
        self._write()

    def summary(self) -> dict[str, float]:
        """Return goodput figures over all attempts of the stage so far, in seconds and as a fraction."""
        now = time.time()
        attempts = [*self._previous, self.ledger]
        wall = 0.0
        restart = 0.0
        stall = 0.0
        lost = 0.0
        for attempt in attempts:
            end = attempt.end_unix or attempt.last_heartbeat_unix or now
            if attempt is self.ledger:
                end = self.ledger.end_unix or now
            wall += max(0.0, end - attempt.start_unix)
            restart += max(0.0, (attempt.first_step_unix or end) - attempt.start_unix)
            stall += attempt.checkpoint_stall_s
            lost += attempt.lost_work_s
        productive = max(0.0, wall - restart - stall - lost)
        return {
            "attempts": float(len(attempts)),
            "wall_time_s": wall,
            "productive_s": productive,
            "restart_s": restart,
            "checkpoint_stall_s": stall,
            "lost_work_s": lost,
            "goodput": productive / wall if wall > 0 else 1.0,
        }

    def scalars(self) -> dict[str, float]:
        """Return the summary as TensorBoard scalar tags under `goodput/`."""
        return {f"goodput/{name}": value for name, value in self.summary().items()}

    def _lost_in(self, attempt: AttemptLedger, step: int) -> float:
        if attempt.last_heartbeat_unix is None or attempt.last_step <= step:
            return 0.0
        kept = [unix for saved_step, unix in attempt.saves if saved_step <= step]
        since = max(kept) if kept else (attempt.first_step_unix or attempt.start_unix)
        return max(0.0, attempt.last_heartbeat_unix - since)

    def _read_previous(self) -> list[AttemptLedger]:
        ledgers = []
        for name in sorted(storage.list_sizes(self._fs, self._dir)):
            path = storage.join(self._dir, name)
            if path == self._path or not name.endswith(".json"):
                continue
            try:
                ledgers.append(AttemptLedger.from_json(storage.read_json(self._fs, path)))
            except (OSError, ValueError, TypeError) as error:
                logger.warning("goodput: skipping unreadable ledger %s: %s", path, error)
        return ledgers

    def _write(self) -> None:
        if self.rank != 0:
            return
        self._last_write = time.monotonic()
        try:
            self._fs.makedirs(self._dir, exist_ok=True)
            storage.write_json(self._fs, self._path, self.ledger.to_json())
        except OSError as error:
            logger.warning("goodput: could not write %s: %s", self._path, error)


def process_start_unix() -> float:
    """Return when this process started (from /proc on Linux), else now."""
    try:
        with open("/proc/self/stat") as stat_file:
            start_ticks = int(stat_file.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as uptime_file:
            uptime = float(uptime_file.read().split()[0])
        return time.time() - uptime + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time()

"""Condense the local pipeline's log into progress lines a person can follow.

kfp's local runner prints every task's full log (executor input, torchrun and
trainer records of every rank). `ProgressView.feed` reads that stream line by
line and prints only: which stage runs, its steps (loss, CE, MSE, tokens/s and
an ETA from the measured step rate), checkpoints, preemptions and resumes,
reuse of promoted checkpoints, promotions and errors. It also records per
stage what happened ("trained", "reused") and how many submissions it took.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Callable, TextIO

# Patterns of the lines this view reads; each comes from the named module's log or print.
_STAGE_START = re.compile(r"^stage (\w+): training \(")  # pipelines.components.train_stage
_STAGE_REUSED = re.compile(r"^stage (\w+): a checkpoint promoted from the same config exists \((\S+)\)")
_PROMOTED = re.compile(r"^stage (\w+) promoted: (\S+) \(digest (\w+)\)")  # promote_stage
_START_STEP = re.compile(r"\[rank0\] INFO bagel\.platform\.train\.trainer: starting at step (\d+) of (\d+) \((.*)\)")
_STEP = re.compile(
    r"\[rank0\] INFO bagel\.platform\.train\.trainer: step (\d+)/(\d+) loss (\S+) ce (\S+) mse (\S+) .*? (\d+) tok/s"
)
_COMMITTED = re.compile(r"\[rank0\] INFO bagel\.platform\.checkpoint\.manager: checkpoint step (\d+) committed")
_SUBMISSION = re.compile(r"bagel\.platform\.launch\.local: local run of [\w-]+/(\w+), submission (\d+)/(\d+): (.*)")
_RETRY = re.compile(r"bagel\.platform\.launch\.local: stage (\w+) was preempted; running it again in (\S+) s")
_TASK_FAILED = re.compile(r"Task '?(\S+?)'? finished with status FAILURE")
# torchrun's traceback after a worker's exit 75 is expected, so tracebacks are left to the log.
_ERROR = re.compile(r"(\bERROR\b|^error:|^Error:)")
# `bagel launch` repeats a failed stage's log tail as ERROR records; the summary shows the tail once.
_LAUNCH_TAIL = re.compile(r"ERROR bagel\.platform\.commands\.launch:\s+\| ")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class StageProgress:
    """The state of one stage as read from the log."""

    outcome: str = "pending"  # "training", "trained" (promoted after training) or "reused"
    submissions: int = 0  # launcher submissions; more than one means it was preempted and resumed
    steps_total: int = 0
    last_step: int = 0
    promoted_uri: str = ""
    promoted_digest: str = ""


def format_duration(seconds: float) -> str:
    """Format seconds as M:SS (or H:MM:SS)."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressView:
    """Print condensed progress from the pipeline's log lines.

    Args:
        out: where progress goes (the terminal).
        nproc: torchrun processes per stage, shown in the stage header.
        clock: monotonic clock in seconds (tests pass a fake one).
    """

    def __init__(self, out: TextIO, nproc: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.out = out
        self.nproc = nproc
        self.clock = clock
        self.stages: dict[str, StageProgress] = {}
        self.current = ""
        self.errors: list[str] = []
        # (clock, step) at the first step line of the current submission, for the ETA.
        self._rate_origin: tuple[float, int] | None = None

    def _print(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def _stage(self, name: str) -> StageProgress:
        return self.stages.setdefault(name, StageProgress())

    def feed(self, raw: str) -> None:
        """Read one line of the pipeline's output (with or without its newline)."""
        line = _ANSI.sub("", raw).strip()
        if not line:
            return
        if match := _STAGE_START.search(line):
            self.current = match.group(1)
            self._stage(self.current).outcome = "training"
            self._rate_origin = None
            self._print(f"\n== {self.current}: training on {self.nproc} rank(s) ==")
        elif match := _STAGE_REUSED.search(line):
            stage = match.group(1)
            self._stage(stage).outcome = "reused"
            self._print(f"\n== {stage}: reusing {match.group(2)} (promoted earlier from the same config digest); not training ==")
        elif match := _PROMOTED.search(line):
            progress = self._stage(match.group(1))
            progress.promoted_uri, progress.promoted_digest = match.group(2), match.group(3)
            if progress.outcome == "training":
                progress.outcome = "trained"
                self._print(f"[{match.group(1)}] promoted {match.group(2)}")
        elif match := _START_STEP.search(line):
            step, total, source = int(match.group(1)), int(match.group(2)), match.group(3)
            self._rate_origin = None
            self._print(f"[{self.current}] starting at step {step}/{total} ({source})")
        elif match := _STEP.search(line):
            self._step(match)
        elif match := _COMMITTED.search(line):
            self._print(f"[{self.current}] checkpoint of step {match.group(1)} saved")
        elif match := _SUBMISSION.search(line):
            progress = self._stage(match.group(1))
            progress.submissions = int(match.group(2))
            if not match.group(4).startswith("succeeded"):
                self._print(f"[{match.group(1)}] submission {match.group(2)}/{match.group(3)}: {match.group(4)}")
        elif match := _RETRY.search(line):
            self._print(f"[{match.group(1)}] preempted: resuming from its last checkpoint in {match.group(2)} s")
        elif match := _TASK_FAILED.search(line):
            self.errors.append(line)
            self._print(f"error: pipeline task {match.group(1)} failed")
        elif _ERROR.search(line) and not _LAUNCH_TAIL.search(line):
            self.errors.append(line)
            self._print(line)

    def _step(self, match: re.Match) -> None:
        step, total = int(match.group(1)), int(match.group(2))
        loss, ce, mse, tokens_per_s = match.group(3), match.group(4), match.group(5), int(match.group(6))
        progress = self._stage(self.current)
        progress.steps_total, progress.last_step = total, step
        now = self.clock()
        if self._rate_origin is None:
            # The first step of a submission includes start-up; measure the rate from here on.
            self._rate_origin = (now, step)
            eta = "?"
        else:
            origin_time, origin_step = self._rate_origin
            per_step = (now - origin_time) / max(1, step - origin_step)
            eta = format_duration(per_step * (total - step))
        # Print about 40 lines per stage at most, always the first and the last step.
        every = max(1, total // 40)
        if step in (1, total) or step % every == 0:
            self._print(
                f"[{self.current}] step {step:>{len(str(total))}}/{total}  loss {loss}  ce {ce}  mse {mse}  "
                f"{tokens_per_s} tok/s  ETA {eta}"
            )

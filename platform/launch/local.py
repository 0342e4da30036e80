"""`bagel launch --backend local`: run a stage with torchrun on this machine, with the cluster's outcome rules.

Each submission starts `python -m bagel.platform.launch.node --standalone
--nproc-per-node N -- train --config ... run.*=...` in its own session and
classifies its exit code like the Kubernetes launcher classifies a pod:
0 succeeded, 75 preempted (run again under the same run and stage, so the
trainer resumes from its checkpoint), 2 user error (never run again), anything
else failed. Ctrl-C sends SIGTERM to the workers, waits the grace period for
their checkpoint, then kills what is left.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Callable, TextIO

from bagel.platform.exit_codes import ExitCode
from bagel.platform.jobs.build import StagePlan
from bagel.platform.jobs.pod import train_args
from bagel.platform.launch.cluster import backoff_delay
from bagel.platform.launch.outcome import DIVERGED_MESSAGE, NCCL_TIMEOUT, LaunchResult, Outcome, strip_torchrun_report

logger = logging.getLogger(__name__)

FAULT_ENV = "BAGEL_FAULT_SIGTERM_AT_STEP"


def local_train_args(plan: StagePlan) -> list[str]:
    """Return the `bagel` arguments of the stage with the config as given on this machine."""
    return train_args(plan.job, plan.stage_run, config=plan.stage_run.config)


def classify_exit(code: int, tail: list[str]) -> LaunchResult:
    """Classify the exit code of one local submission."""
    if code == ExitCode.SUCCESS:
        return LaunchResult(Outcome.SUCCEEDED, "Succeeded", exit_code=0, log_tail=tail)
    if code == ExitCode.PREEMPTED:
        return LaunchResult(Outcome.PREEMPTED, "CheckpointedOnSignal", "the trainer saved and stopped", exit_code=code, log_tail=tail)
    if code == ExitCode.USAGE_ERROR:
        return LaunchResult(Outcome.FAILED, "UserError", "invalid config or data, not retried", exit_code=code, log_tail=tail)
    if code == ExitCode.DIVERGED:
        return LaunchResult(Outcome.FAILED, "Diverged", DIVERGED_MESSAGE, exit_code=code, log_tail=tail)
    timeouts = [line for line in tail if NCCL_TIMEOUT.search(line)]
    if timeouts:
        return LaunchResult(Outcome.FAILED, "NCCLTimeout", timeouts[-1].strip(), exit_code=code, log_tail=tail)
    if code in (137, -signal.SIGKILL):
        return LaunchResult(Outcome.FAILED, "Killed", "killed by SIGKILL (out of memory?)", exit_code=code, log_tail=tail)
    return LaunchResult(Outcome.FAILED, "Failed", tail[-1].strip() if tail else "", exit_code=code, log_tail=tail)


class LocalLauncher:
    """Run one stage on this machine until it succeeds, fails for good or spends its submission budget.

    Args:
        plan: the stage plan (its job section gives the retry budget and grace period).
        nproc: torchrun processes.
        script: a Python file run instead of `bagel train` by every rank (tests of the launcher wiring).
        preempt_at_step: sets BAGEL_FAULT_SIGTERM_AT_STEP for the first submission only, so the
            trainer is stopped by SIGTERM at that step once and resumes in the next submission.
        out: where the processes' output goes (None: this process's stdout).
    """

    def __init__(
        self,
        plan: StagePlan,
        nproc: int = 1,
        script: str | None = None,
        preempt_at_step: int | None = None,
        out: TextIO | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.plan = plan
        self.nproc = nproc
        self.script = script
        self.preempt_at_step = preempt_at_step
        self._out = out
        self._sleep = sleep

    def command(self) -> list[str]:
        script = ["--script", self.script] if self.script else []
        return [
            sys.executable,
            "-m",
            "bagel.platform.launch.node",
            "--standalone",
            f"--nproc-per-node={self.nproc}",
            "--",
            *script,
            *local_train_args(self.plan),
        ]

    def launch(self) -> LaunchResult:
        retry = self.plan.job.retry
        result: LaunchResult | None = None
        for submission in range(1, retry.max_submissions + 1):
            env = dict(os.environ)
            env.pop(FAULT_ENV, None)
            if self.preempt_at_step is not None and submission == 1:
                env[FAULT_ENV] = str(self.preempt_at_step)
            result = self._run(env)
            result.submissions = submission
            logger.info("local run of %s/%s, submission %d/%d: %s", self.plan.stage_run.run, self.plan.stage_run.stage,
                        submission, retry.max_submissions, result.describe())
            if not result.retryable:
                return result
            if submission < retry.max_submissions:
                delay = backoff_delay(submission, retry.backoff_s, retry.backoff_max_s)
                logger.warning("stage %s was preempted; running it again in %.0f s", self.plan.stage_run.stage, delay)
                self._sleep(delay)
        assert result is not None
        result.message = f"{result.message} (submission budget of {retry.max_submissions} spent)".strip()
        return result

    def _run(self, env: dict[str, str]) -> LaunchResult:
        tail: collections.deque[str] = collections.deque(maxlen=50)
        out = self._out or sys.stdout
        process = subprocess.Popen(
            self.command(), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        try:
            assert process.stdout is not None
            for line in process.stdout:
                tail.append(line.rstrip("\n"))
                out.write(line)
                out.flush()
            code = process.wait()
        except BaseException:
            self._stop(process)
            raise
        return classify_exit(code, strip_torchrun_report(list(tail)))

    def _stop(self, process: subprocess.Popen) -> None:
        """SIGTERM the node (it forwards to the workers), wait the grace period, then SIGKILL the session."""
        logger.warning("stopping the local run (pid %d): SIGTERM, then SIGKILL after %d s", process.pid, self.plan.grace_period_s)
        try:
            process.send_signal(signal.SIGTERM)
            process.wait(self.plan.grace_period_s)
        except subprocess.TimeoutExpired:
            pass
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()

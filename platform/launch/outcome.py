"""Classify how a training job ended, from the job object, its pods and the rank-0 log tail.

Rules, in order (the first match wins):

1. job condition Complete/Succeeded=True                        -> succeeded
2. a pod with DisruptionTarget=True (scheduler preemption, eviction, drain,
   node shutdown, taint or pod GC), pod reason Evicted/NodeLost/Terminated,
   or a container exit code 75 (the trainer saved and stopped on SIGTERM) -> preempted
3. a container exit code 2, or the JobSet user-error rule               -> failed (user error, never retried)
   a container exit code 3, or the JobSet diverged rule                 -> failed (diverged, never retried)
4. OOMKilled, or an NCCL timeout in the log tail                        -> failed with that reason
5. a job condition Failed=True otherwise                                -> failed with its reason and message

Kueue evictions suspend the job instead of failing it. When a running job
becomes suspended, the launcher classifies it as preempted (reason KueueEvicted).
Unschedulable jobs never end by themselves; the launcher decides that after
a pending deadline (see `pending_reason`).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Any

from bagel.platform.exit_codes import ExitCode

NCCL_TIMEOUT = re.compile(r"(NCCL|ProcessGroupNCCL|Watchdog).*(timeout|timed out)", re.IGNORECASE)
_PREEMPTED_POD_REASONS = {"Evicted", "NodeLost", "Terminated", "Preempting", "NodeShutdown"}
DIVERGED_MESSAGE = "the loss-spike policy stopped training (see the log for the step and loss term), not retried"
# (exit code, JobSet failure message pattern, reason, message), checked in this order.
_FINAL_FAILURES = (
    (ExitCode.USAGE_ERROR, re.compile(r"exit code 2 matching FailJob rule at index 0"), "UserError",
     "invalid config or data, not retried"),
    (ExitCode.DIVERGED, re.compile(r"exit code 3 matching FailJob rule at index 1"), "Diverged", DIVERGED_MESSAGE),
)


class Outcome(enum.Enum):
    SUCCEEDED = "succeeded"
    PREEMPTED = "preempted"
    UNSCHEDULABLE = "unschedulable"
    FAILED = "failed"


@dataclass
class LaunchResult:
    """The end of a stage: its outcome, reason and evidence."""

    outcome: Outcome
    reason: str
    """A short CamelCase reason (UserError, Diverged, OOMKilled, NCCLTimeout, PreemptionByScheduler, Unschedulable, ...)."""
    message: str = ""
    exit_code: int | None = None
    """Exit code of the training container (rank 0 first) when one was seen."""
    log_tail: list[str] = field(default_factory=list)
    submissions: int = 1

    @property
    def retryable(self) -> bool:
        return self.outcome in (Outcome.PREEMPTED, Outcome.UNSCHEDULABLE)

    def process_exit_code(self) -> int:
        """Return the exit code of `bagel launch` for this result."""
        if self.outcome is Outcome.SUCCEEDED:
            return ExitCode.SUCCESS
        if self.reason == "UserError":
            return ExitCode.USAGE_ERROR
        if self.reason == "Diverged":
            return ExitCode.DIVERGED
        if self.retryable:
            return ExitCode.PREEMPTED
        return ExitCode.FAILURE

    def describe(self) -> str:
        text = f"{self.outcome.value} ({self.reason})"
        if self.exit_code is not None:
            text += f", exit code {self.exit_code}"
        if self.message:
            text += f": {self.message}"
        return text


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """Return the status condition of type `kind` whose status is "True", or None."""
    for item in (obj.get("status") or {}).get("conditions") or []:
        if item.get("type") == kind and str(item.get("status")) == "True":
            return item
    return None


def job_phase(job: dict[str, Any]) -> str:
    """Return "succeeded", "failed", "suspended" or "active" for a TrainJob or PyTorchJob object."""
    if condition(job, "Complete") or condition(job, "Succeeded"):
        return "succeeded"
    if condition(job, "Failed"):
        return "failed"
    if condition(job, "Suspended") or (job.get("spec") or {}).get("suspend") is True:
        return "suspended"
    return "active"


def _terminated_states(pod: dict[str, Any]) -> list[dict[str, Any]]:
    states = []
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        for key in ("state", "lastState"):
            terminated = (status.get(key) or {}).get("terminated")
            if terminated:
                states.append(terminated)
    return states


def _preemption(pod: dict[str, Any]) -> tuple[str, str] | None:
    disruption = condition(pod, "DisruptionTarget")
    if disruption:
        return disruption.get("reason") or "DisruptionTarget", disruption.get("message") or ""
    status = pod.get("status") or {}
    if status.get("reason") in _PREEMPTED_POD_REASONS:
        return status["reason"], status.get("message") or ""
    return None


def classify_finished(job: dict[str, Any], pods: list[dict[str, Any]], log_tail: list[str]) -> LaunchResult:
    """Classify a job that reached a terminal condition (or lost its pods); `pods` rank 0 first."""
    exit_codes = [(pod, state) for pod in pods for state in _terminated_states(pod)]
    if job_phase(job) == "succeeded":
        return LaunchResult(Outcome.SUCCEEDED, "Succeeded", exit_code=0, log_tail=log_tail)

    for pod in pods:
        found = _preemption(pod)
        if found:
            return LaunchResult(Outcome.PREEMPTED, found[0], f"pod {pod['metadata']['name']}: {found[1]}".rstrip(": "), log_tail=log_tail)
    for pod, state in exit_codes:
        if state.get("exitCode") == ExitCode.PREEMPTED:
            return LaunchResult(
                Outcome.PREEMPTED, "CheckpointedOnSignal", f"pod {pod['metadata']['name']} saved and stopped",
                exit_code=ExitCode.PREEMPTED, log_tail=log_tail,
            )

    failed = condition(job, "Failed") or {}
    # Failures that a retry would repeat: from a pod's exit code, or from the
    # JobSet rule's message once the pods are gone.
    for code, pattern, reason, message in _FINAL_FAILURES:
        for pod, state in exit_codes:
            if state.get("exitCode") == code:
                return LaunchResult(
                    Outcome.FAILED, reason, f"pod {pod['metadata']['name']}: {message}", exit_code=code, log_tail=log_tail,
                )
        if pattern.search(failed.get("message") or ""):
            return LaunchResult(Outcome.FAILED, reason, failed.get("message", ""), exit_code=code, log_tail=log_tail)
    for pod, state in exit_codes:
        if state.get("reason") == "OOMKilled":
            return LaunchResult(
                Outcome.FAILED, "OOMKilled", f"pod {pod['metadata']['name']} ran out of memory",
                exit_code=state.get("exitCode"), log_tail=log_tail,
            )
    if any(NCCL_TIMEOUT.search(line) for line in log_tail):
        line = next(line for line in reversed(log_tail) if NCCL_TIMEOUT.search(line))
        return LaunchResult(Outcome.FAILED, "NCCLTimeout", line.strip(), exit_code=_first_nonzero(exit_codes), log_tail=log_tail)
    return LaunchResult(
        Outcome.FAILED,
        failed.get("reason") or "Failed",
        failed.get("message") or "the job failed without a condition message",
        exit_code=_first_nonzero(exit_codes),
        log_tail=log_tail,
    )


def strip_torchrun_report(lines: list[str]) -> list[str]:
    """Return `lines` without torchrun's failure report (agent errors, ChildFailedError traceback and table).

    The report only repeats the exit codes and would push the worker's own
    error message out of the tail that is shown to the user.
    """
    worker_lines = [line for line in lines if not (line.startswith("E") and "torch/distributed/elastic" in line)]
    for index in range(len(worker_lines) - 1, -1, -1):
        if "ChildFailedError" in worker_lines[index]:
            tracebacks = [i for i in range(index + 1) if worker_lines[i].startswith("Traceback (most recent call last):")]
            return worker_lines[: tracebacks[-1] if tracebacks else index]
    return worker_lines


def _first_nonzero(exit_codes: list[tuple[dict[str, Any], dict[str, Any]]]) -> int | None:
    for _, state in exit_codes:
        if state.get("exitCode"):
            return int(state["exitCode"])
    return None


def pending_reason(pods: list[dict[str, Any]], events: list[dict[str, Any]]) -> str:
    """Return the scheduler's reason why pods are pending (PodScheduled condition, else FailedScheduling events)."""
    for pod in pods:
        for item in (pod.get("status") or {}).get("conditions") or []:
            if item.get("type") == "PodScheduled" and str(item.get("status")) == "False":
                return f"{item.get('reason', 'Unschedulable')}: {item.get('message', '')}".rstrip(": ")
    for event in reversed(events):
        if event.get("reason") == "FailedScheduling":
            return f"FailedScheduling: {event.get('message', '')}"
    return "no pod was scheduled"


def is_pod_pending(pod: dict[str, Any]) -> bool:
    """True while a pod waits for a node (phase Pending and not yet scheduled)."""
    status = pod.get("status") or {}
    if status.get("phase", "Pending") != "Pending":
        return False
    scheduled = next((c for c in status.get("conditions") or [] if c.get("type") == "PodScheduled"), None)
    return scheduled is None or str(scheduled.get("status")) != "True"

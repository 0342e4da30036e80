"""Graceful preemption: SIGTERM → finish the step, save, exit `ExitCode.PREEMPTED` (75).

Kubernetes (spot reclaim, node drain, scheduler preemption) sends SIGTERM to
every container and SIGKILL after `terminationGracePeriodSeconds`. The signal
handler only sets a flag; the training loop asks `should_stop()` after each
step, which all-reduces the flag so that every rank stops after the same step
even when the signal reached only some of them. The loop then saves a blocking
checkpoint and exits 75, which the launchers read as "preempted, retry".

A watchdog thread started by the signal exits the process with 75 when
`deadline_seconds` pass before the loop has exited: the save has not
committed, so the restart resumes from the previous complete checkpoint,
which the commit protocol keeps valid. Set the deadline a few seconds under
the pod's grace period so the exit is ours rather than the kubelet's SIGKILL.

Fault injection for tests (read by `inject_fault`, called after every step):
- `BAGEL_FAULT_SIGTERM_AT_STEP=N`: after step N, each selected rank sends
  SIGTERM to itself, as the kubelet does to every process;
- `BAGEL_FAULT_SIGKILL_AT_STEP=N`: after step N, each selected rank kills
  itself with SIGKILL (a background save may be in flight; nothing is flushed);
- `BAGEL_FAULT_RANKS=0,1`: the global ranks that act (default: all).
Set these for one attempt only: a resumed run that passes step N again
would fire again.
"""

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from types import FrameType

import torch
import torch.distributed as dist

from bagel.platform.exit_codes import ExitCode

logger = logging.getLogger(__name__)

FAULT_SIGTERM_ENV = "BAGEL_FAULT_SIGTERM_AT_STEP"
FAULT_SIGKILL_ENV = "BAGEL_FAULT_SIGKILL_AT_STEP"
FAULT_RANKS_ENV = "BAGEL_FAULT_RANKS"


@dataclass
class PreemptionConfig:
    """SIGTERM handling settings (the `preemption` section of a stage config)."""

    deadline_seconds: float = 25.0
    """Seconds from SIGTERM until the process exits even if its final save has not finished.
    Keep it a few seconds under the pod's terminationGracePeriodSeconds (Kubernetes default: 30)."""

    def __post_init__(self) -> None:
        if self.deadline_seconds <= 0:
            raise ValueError(f"preemption.deadline_seconds={self.deadline_seconds} is invalid: use a positive number of seconds")


class PreemptionHandler:
    """Turn SIGTERM into a flag that the training loop checks after each step."""

    def __init__(self, config: PreemptionConfig | None = None) -> None:
        self.config = config or PreemptionConfig()
        self.signal_time: float | None = None  # time.monotonic() of the first SIGTERM
        self._flag = threading.Event()
        self._pg: dist.ProcessGroup | None = None
        self._watchdog: threading.Timer | None = None

    def install(self) -> None:
        """Register the SIGTERM handler; call from the main thread before any long setup."""
        signal.signal(signal.SIGTERM, self._on_signal)

    @property
    def requested(self) -> bool:
        """Whether this process received SIGTERM (no collective)."""
        return self._flag.is_set()

    def should_stop(self) -> bool:
        """Return True on every rank when any rank received SIGTERM; collective over all ranks."""
        local = self._flag.is_set()
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return local
        if self._pg is None:
            # A gloo group of its own, so the check works beside NCCL and never
            # queues behind training collectives.
            self._pg = dist.new_group(backend="gloo")
        flag = torch.tensor([1 if local else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._pg)
        stop = bool(flag.item())
        if stop and not local:
            logger.warning("another rank received SIGTERM: stopping after this step")
            self._start_watchdog()
        return stop

    def deadline_remaining(self) -> float:
        """Seconds left until the watchdog exits the process (inf before any SIGTERM)."""
        if self.signal_time is None:
            return float("inf")
        return self.config.deadline_seconds - (time.monotonic() - self.signal_time)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._flag.is_set():
            logger.warning("received signal %d again: already stopping", signum)
            return
        self._flag.set()
        logger.warning(
            "received SIGTERM: finishing the current step, then saving within %.0f s and exiting with %d (preempted)",
            self.config.deadline_seconds,
            int(ExitCode.PREEMPTED),
        )
        self._start_watchdog()

    def _start_watchdog(self) -> None:
        if self._watchdog is not None:
            return
        if self.signal_time is None:
            self.signal_time = time.monotonic()
        self._watchdog = threading.Timer(self.config.deadline_seconds, self._expire)
        self._watchdog.daemon = True
        self._watchdog.start()

    def _expire(self) -> None:
        logger.error(
            "preemption deadline of %.0f s passed before the final save finished: exiting with %d; "
            "the restart resumes from the previous complete checkpoint",
            self.config.deadline_seconds,
            int(ExitCode.PREEMPTED),
        )
        logging.shutdown()
        os._exit(int(ExitCode.PREEMPTED))


def inject_fault(step: int) -> None:
    """Send the test fault configured for `step` through the BAGEL_FAULT_* variables (see the module docstring)."""
    ranks = os.environ.get(FAULT_RANKS_ENV, "")
    rank = int(os.environ.get("RANK", "0"))
    if ranks and rank not in {int(r) for r in ranks.split(",") if r.strip()}:
        return
    if _fault_step(FAULT_SIGKILL_ENV) == step:
        logger.warning("fault injection: SIGKILL after step %d", step)
        os.kill(os.getpid(), signal.SIGKILL)
    if _fault_step(FAULT_SIGTERM_ENV) == step:
        logger.warning("fault injection: SIGTERM after step %d", step)
        os.kill(os.getpid(), signal.SIGTERM)


def _fault_step(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is invalid: use a step number") from None

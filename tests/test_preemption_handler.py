"""PreemptionHandler in one process: SIGTERM sets the stop flag, and the deadline watchdog exits with 75."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from bagel.platform.exit_codes import ExitCode
from bagel.platform.preemption import PreemptionConfig, PreemptionHandler, inject_fault


def test_sigterm_sets_stop_flag():
    handler = PreemptionHandler(PreemptionConfig(deadline_seconds=60))
    previous = signal.getsignal(signal.SIGTERM)
    handler.install()
    try:
        assert not handler.should_stop()
        assert handler.deadline_remaining() == float("inf")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the Python-level handler runs at the next bytecode boundary
        assert handler.requested
        assert handler.should_stop()
        assert 0 < handler.deadline_remaining() <= 60
    finally:
        signal.signal(signal.SIGTERM, previous)
        handler._watchdog.cancel()


def test_deadline_exits_preempted():
    # A save that never finishes: the watchdog must end the process with 75
    # after the deadline, before the kubelet's SIGKILL would.
    script = textwrap.dedent(
        """
        import os, signal, time
        from bagel.platform.log import setup_logging
        from bagel.platform.preemption import PreemptionConfig, PreemptionHandler
        setup_logging()
        handler = PreemptionHandler(PreemptionConfig(deadline_seconds=1.0))
        handler.install()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
        """
    )
    begin = time.monotonic()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - begin
    assert result.returncode == ExitCode.PREEMPTED, result.stderr
    assert elapsed < 25
    assert "preemption deadline of 1 s passed" in result.stderr


def test_fault_hook_rejects_bad_step(monkeypatch):
    monkeypatch.setenv("BAGEL_FAULT_SIGTERM_AT_STEP", "three")
    with pytest.raises(ValueError, match="BAGEL_FAULT_SIGTERM_AT_STEP='three' is invalid"):
        inject_fault(3)


@pytest.mark.parametrize(("rank", "expected_code"), [("0", 0), ("1", -signal.SIGKILL)])
def test_fault_hook_selects_ranks(rank, expected_code):
    script = "from bagel.platform.preemption import inject_fault; inject_fault(1); print('alive')"
    env = dict(os.environ, RANK=rank, BAGEL_FAULT_SIGKILL_AT_STEP="1", BAGEL_FAULT_RANKS="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == expected_code, result.stderr
    assert ("alive" in result.stdout) == (expected_code == 0)

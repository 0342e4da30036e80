"""Stopping a child process that this process started."""

import subprocess


def stop_process(process: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """Send SIGTERM and wait up to `timeout_s`; then SIGKILL and wait again. A finished process is left alone."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout_s)

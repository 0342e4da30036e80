"""The entry point of one training node (a pod, or this machine): torchrun plus exit-code propagation.

    python -m bagel.platform.launch.node [TORCHRUN OPTIONS] -- [--script PATH] ARGS...

starts `torchrun [TORCHRUN OPTIONS] -m bagel.platform.launch.rank ARGS...`
(each worker runs `bagel ARGS...`) and exits with:

* 2 (USAGE_ERROR) if any worker exited with 2, since a bad config fails every rank alike;
* 3 (DIVERGED) if any worker exited with 3 and none with 2 (the spike policy
  decides on losses reduced over all ranks, so every rank stops alike);
* 75 (PREEMPTED) if any worker exited with 75 and none with 2 or 3;
* otherwise torchrun's own exit code.

On SIGTERM (the kubelet stopping the pod, or `bagel launch` stopping a local
run) the signal goes straight to the workers, not to torchrun. After
forwarding a SIGTERM itself, torchrun would SIGKILL its workers 30 s later
(torch 2.13 `PContext.close`), which can cut a preemption checkpoint short.
Here torchrun only notices that its workers exited, and returns.
"""

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from bagel.platform.exit_codes import ExitCode


def child_pids(pid: int) -> list[int]:
    """Return the direct children of process `pid` (Linux /proc); [] where /proc lacks the list."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children.extend(int(p) for p in (task / "children").read_text().split())
        except OSError:
            continue
    return children


def signal_workers(torchrun_pid: int, signum: int) -> None:
    """Send `signum` to torchrun's workers, or to torchrun's whole process group if they cannot be listed."""
    workers = child_pids(torchrun_pid)
    if not workers:
        try:
            os.killpg(torchrun_pid, signum)
        except ProcessLookupError:
            pass
        return
    for worker in workers:
        try:
            os.kill(worker, signum)
        except ProcessLookupError:
            pass


def combine_exit_codes(torchrun_code: int, rank_codes: list[int]) -> int:
    """Return the node's exit code from torchrun's and the workers' codes (rules in the module docstring)."""
    if ExitCode.USAGE_ERROR in rank_codes:
        return ExitCode.USAGE_ERROR
    if ExitCode.DIVERGED in rank_codes:
        return ExitCode.DIVERGED
    if ExitCode.PREEMPTED in rank_codes:
        return ExitCode.PREEMPTED
    if torchrun_code == 0 and any(rank_codes):
        return next(code for code in rank_codes if code)
    return torchrun_code


def run_node(torchrun_options: list[str], args: list[str]) -> int:
    """Run torchrun with the rank wrapper and return the combined exit code."""
    with tempfile.TemporaryDirectory(prefix="bagel-exit-") as exit_dir:
        env = {**os.environ, "BAGEL_EXIT_CODE_DIR": exit_dir}
        command = [sys.executable, "-m", "torch.distributed.run", *torchrun_options, "-m", "bagel.platform.launch.rank", *args]
        process = subprocess.Popen(command, env=env, start_new_session=True)

        def forward(signum: int, _frame: object) -> None:
            signal_workers(process.pid, signum)

        previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            torchrun_code = process.wait()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        rank_codes = [int(p.read_text() or 1) for p in sorted(Path(exit_dir).glob("rank-*"))]
    # A negative Popen code means torchrun died on a signal; report it the shell's way.
    return combine_exit_codes(torchrun_code if torchrun_code >= 0 else 128 - torchrun_code, rank_codes)


def main() -> None:
    argv = sys.argv[1:]
    if "--" not in argv:
        print("usage: python -m bagel.platform.launch.node [TORCHRUN OPTIONS] -- [--script PATH] ARGS...", file=sys.stderr)
        sys.exit(ExitCode.USAGE_ERROR)
    split = argv.index("--")
    sys.exit(run_node(argv[:split], argv[split + 1 :]))


if __name__ == "__main__":
    main()

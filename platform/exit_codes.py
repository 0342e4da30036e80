"""Process exit codes of `bagel train` and `bagel launch`, shared with the launchers.

A launcher (the Kubernetes job's restart rules, `bagel launch`, the local
runner) retries PREEMPTED and never retries USAGE_ERROR or DIVERGED, because
a bad config fails the same way every time, and a diverged run resumed from
its last checkpoint replays the same data into the same divergence.
"""

import enum


class ExitCode(enum.IntEnum):
    SUCCESS = 0
    # Unexpected failure (a crash, an OOM): the launcher reports it and may retry
    # within its budget.
    FAILURE = 1
    # Invalid configuration, arguments or input data: retrying cannot help.
    USAGE_ERROR = 2
    # The loss-spike policy stopped training (a non-finite loss, a spike under
    # `train.spike.policy: stop`, or too many consecutive skipped steps).
    DIVERGED = 3
    # The job stopped on SIGTERM after saving a complete checkpoint, so a restart
    # resumes it. 75 is EX_TEMPFAIL in sysexits.h ("temporary failure, retry").
    PREEMPTED = 75


class UsageError(Exception):
    """Invalid user input (config, arguments, data location); maps to ExitCode.USAGE_ERROR."""

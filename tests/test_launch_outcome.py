"""Outcome rules of the launcher on job, pod and event objects as the API server returns them."""

import pytest

from bagel.platform.exit_codes import ExitCode
from bagel.platform.launch.outcome import (
    Outcome,
    classify_finished,
    is_pod_pending,
    job_phase,
    pending_reason,
)

FAILED_JOB = {"status": {"conditions": [{"type": "Failed", "status": "True", "reason": "FailedJobs", "message": "jobset failed"}]}}


def pod(name="p-0", phase="Failed", exit_code=None, reason=None, conditions=(), pod_reason=None):
    status = {"phase": phase, "conditions": list(conditions)}
    if pod_reason:
        status["reason"] = pod_reason
    if exit_code is not None:
        status["containerStatuses"] = [{"name": "node", "state": {"terminated": {"exitCode": exit_code, "reason": reason or "Error"}}}]
    return {"metadata": {"name": name}, "status": status}


@pytest.mark.parametrize(
    "job, expected",
    [
        ({"status": {"conditions": [{"type": "Complete", "status": "True"}]}}, "succeeded"),
        ({"status": {"conditions": [{"type": "Succeeded", "status": "True"}]}}, "succeeded"),
        ({"status": {"conditions": [{"type": "Created", "status": "True"}, {"type": "Failed", "status": "True"}]}}, "failed"),
        ({"status": {"conditions": [{"type": "Failed", "status": "False"}]}}, "active"),
        ({"spec": {"suspend": True}}, "suspended"),
        ({"status": {"conditions": [{"type": "Suspended", "status": "True"}]}}, "suspended"),
        ({}, "active"),
    ],
)
def test_job_phase(job, expected):
    assert job_phase(job) == expected


@pytest.mark.parametrize(
    "reason", ["PreemptionByScheduler", "TerminationByKubelet", "EvictionByEvictionAPI", "DeletionByTaintManager", "DeletionByPodGC"]
)
def test_disruption_target_is_preemption(reason):
    disrupted = pod(exit_code=143, conditions=[{"type": "DisruptionTarget", "status": "True", "reason": reason}])
    result = classify_finished(FAILED_JOB, [pod(name="rank0", exit_code=1), disrupted], [])
    assert result.outcome is Outcome.PREEMPTED
    assert result.reason == reason
    assert result.retryable


def test_node_lost_is_preemption():
    result = classify_finished(FAILED_JOB, [pod(phase="Failed", pod_reason="NodeLost")], [])
    assert result.outcome is Outcome.PREEMPTED
    assert result.reason == "NodeLost"


def test_preempted_exit_code_wins_over_failure():
    result = classify_finished(FAILED_JOB, [pod(exit_code=75), pod(name="p-1", exit_code=1)], [])
    assert result.outcome is Outcome.PREEMPTED
    assert result.exit_code == ExitCode.PREEMPTED


def test_user_error_from_jobset_message():
    failed = {
        "type": "Failed",
        "status": "True",
        "reason": "FailedJobs",
        "message": "Container node for pod ns/x failed with exit code 2 matching FailJob rule at index 0",
    }
    job = {"status": {"conditions": [failed]}}
    result = classify_finished(job, [], [])
    assert result.reason == "UserError"
    assert result.process_exit_code() == ExitCode.USAGE_ERROR
    assert not result.retryable


def test_diverged_from_exit_code_and_jobset_message():
    """Exit code 3 (the spike policy stopped training) fails for good, from the pod or from the JobSet rule's message."""
    from_pod = classify_finished(FAILED_JOB, [pod(exit_code=3), pod(name="p-1", exit_code=3)], [])
    failed = {
        "type": "Failed",
        "status": "True",
        "reason": "FailedJobs",
        "message": "Container node for pod ns/x failed with exit code 3 matching FailJob rule at index 1",
    }
    from_message = classify_finished({"status": {"conditions": [failed]}}, [], [])
    for result in (from_pod, from_message):
        assert result.outcome is Outcome.FAILED
        assert result.reason == "Diverged"
        assert result.process_exit_code() == ExitCode.DIVERGED
        assert not result.retryable


def test_nccl_timeout_from_log_tail():
    tail = ["step 10", "[Rank 3] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=9, OpType=ALLREDUCE) ran for 600000 ms"]
    result = classify_finished(FAILED_JOB, [pod(exit_code=1)], tail)
    assert result.reason == "NCCLTimeout"
    assert "ALLREDUCE" in result.message
    assert result.process_exit_code() == ExitCode.FAILURE


def test_plain_failure_keeps_job_message():
    result = classify_finished(FAILED_JOB, [pod(exit_code=1)], ["Traceback", "ValueError: boom"])
    assert result.outcome is Outcome.FAILED
    assert result.reason == "FailedJobs"
    assert result.exit_code == 1
    assert result.log_tail[-1] == "ValueError: boom"


def test_pending_reason_prefers_pod_condition():
    pending = pod(phase="Pending", conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/8 nodes: taint"}])
    assert pending_reason([pending], []) == "Unschedulable: 0/8 nodes: taint"
    assert is_pod_pending(pending)


def test_pending_reason_from_events():
    events = [{"reason": "Scheduled", "message": "ok"}, {"reason": "FailedScheduling", "message": "Insufficient nvidia.com/gpu"}]
    assert pending_reason([pod(phase="Pending")], events) == "FailedScheduling: Insufficient nvidia.com/gpu"
    assert pending_reason([], []) == "no pod was scheduled"


def test_scheduled_pod_not_pending():
    assert not is_pod_pending(pod(phase="Pending", conditions=[{"type": "PodScheduled", "status": "True"}]))
    assert not is_pod_pending(pod(phase="Running"))

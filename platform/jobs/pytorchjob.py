"""A training-operator v1 PyTorchJob per stage, for clusters without Kubeflow Trainer v2.

Restart rules: replica `restartPolicy: ExitCode` makes the operator recreate a
pod whose container exits with a code >= 128 (SIGKILL 137, SIGTERM 143, which
is what a node loss or an eviction without a checkpoint produces) and fail the
job on 1-127. The trainer's preempted exit code 75 is below 128, so a
preemption with a saved checkpoint fails the job. `bagel launch` then
resubmits it under the same run, where training resumes from the checkpoint.
A user error (2) or a divergence (3) fails it for good. `runPolicy.backoffLimit` does not bound
ExitCode recreations (the operator counts container restarts, which stay 0),
so the launcher's submission budget is the real bound.
"""

from __future__ import annotations

from typing import Any

from bagel.platform.jobs import pod
from bagel.platform.jobs.config import JobConfig

API_VERSION = "kubeflow.org/v1"
CONTAINER = "pytorch"  # the container name the v1 operator expects
MASTER_PORT = 23456  # the operator's default pytorchjob-port


def _pod_template(job: JobConfig, stage_run: pod.StageRun, labels: dict[str, str], grace_period_s: int) -> dict[str, Any]:
    spec: dict[str, Any] = {
        **pod.node_placement(job),
        "terminationGracePeriodSeconds": grace_period_s,
        "securityContext": pod.pod_security_context(),
        "containers": [
            {
                "name": CONTAINER,
                "image": job.image,
                "imagePullPolicy": job.image_pull_policy,
                "command": pod.NODE_COMMAND,
                "args": pod.train_args(job, stage_run),
                "env": pod.env(job),
                "resources": pod.resources(job),
                "ports": [{"name": "pytorchjob-port", "containerPort": MASTER_PORT, "protocol": "TCP"}],
                "securityContext": pod.container_security_context(),
                "volumeMounts": pod.volume_mounts(job),
            }
        ],
        "volumes": pod.volumes(job),
    }
    if job.service_account:
        spec["serviceAccountName"] = job.service_account
    if job.scheduling.priority_class:
        spec["priorityClassName"] = job.scheduling.priority_class
    if job.scheduling.scheduler_name:
        spec["schedulerName"] = job.scheduling.scheduler_name
    return {"metadata": {"labels": labels}, "spec": spec}


def build_pytorchjob(
    job: JobConfig, stage_run: pod.StageRun, grace_period_s: int, submission: int = 1
) -> dict[str, Any]:
    """Return the PyTorchJob of one stage: one Master pod plus nodes-1 Worker pods, one per node."""
    labels = pod.labels(job, stage_run, submission)
    template = _pod_template(job, stage_run, labels, grace_period_s)
    replica_specs: dict[str, Any] = {"Master": {"replicas": 1, "restartPolicy": "ExitCode", "template": template}}
    if job.nodes > 1:
        replica_specs["Worker"] = {"replicas": job.nodes - 1, "restartPolicy": "ExitCode", "template": template}

    run_policy: dict[str, Any] = {
        # Delete every pod when the job ends so that no GPU stays held by a finished rank.
        "cleanPodPolicy": "All",
        "backoffLimit": job.retry.max_restarts,
    }
    if job.active_deadline_s:
        run_policy["activeDeadlineSeconds"] = job.active_deadline_s
    if job.scheduling.gang != "none":
        # Used when the operator runs with --gang-scheduler-name (volcano or scheduler-plugins).
        scheduling: dict[str, Any] = {
            "minAvailable": job.nodes,
            "scheduleTimeoutSeconds": job.scheduling.schedule_timeout_s,
        }
        if job.scheduling.priority_class:
            scheduling["priorityClass"] = job.scheduling.priority_class
        run_policy["schedulingPolicy"] = scheduling

    return {
        "apiVersion": API_VERSION,
        "kind": "PyTorchJob",
        "metadata": {
            "name": pod.job_name(stage_run.run, stage_run.stage),
            "namespace": job.namespace,
            "labels": {**labels, **pod.queue_labels(job)},
        },
        "spec": {
            "nprocPerNode": str(job.procs),
            "runPolicy": run_policy,
            "pytorchReplicaSpecs": replica_specs,
        },
    }

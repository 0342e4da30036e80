"""Kubeflow Trainer v2.3 objects: the BAGEL ClusterTrainingRuntime and one TrainJob per stage.

Restart rules live in the runtime's JobSet template because TrainJob has no
restart fields:

* the `node` Job has `backoffLimit: 0` and a podFailurePolicy that fails it at
  once, with reason PodFailurePolicy, on the trainer's user-error exit code (2),
  its diverged exit code (3), its preempted exit code (75) and on the
  DisruptionTarget pod condition (scheduler preemption, eviction, node drain or
  shutdown);
* the JobSet failurePolicy then fails the whole JobSet on a user error or a
  divergence, restarts it without spending `maxRestarts` on preemption, and
  restarts it within `maxRestarts` on any other failure (a crash, an OOM kill,
  an NCCL timeout).

All pods of the gang restart together (torchrun's static rendezvous cannot
replace one rank), and `BlockingRecreate` waits until the old pods are gone
so the new ones do not wait for GPUs that terminating pods still hold.
"""

from __future__ import annotations

from typing import Any

from bagel.platform.exit_codes import ExitCode
from bagel.platform.jobs import pod
from bagel.platform.jobs.config import JobConfig

API_VERSION = "trainer.kubeflow.org/v1alpha1"
CONTAINER = "node"  # the container name Trainer's torch plugin expects
REPLICATED_JOB = "node"

# Job condition message of a podFailurePolicy FailJob match (kube-controller-manager's
# pod failure policy code): "Container node for pod NS/POD failed with exit code 2 matching FailJob rule at index 0".
USER_ERROR_MESSAGE = f"failed with exit code {int(ExitCode.USAGE_ERROR)} matching FailJob rule at index 0"
DIVERGED_MESSAGE = f"failed with exit code {int(ExitCode.DIVERGED)} matching FailJob rule at index 1"


def pod_failure_policy() -> dict[str, Any]:
    """Return the child Job's podFailurePolicy (rules 0 and 1 must keep their places, see USER_ERROR_MESSAGE)."""
    return {
        "rules": [
            {
                "action": "FailJob",
                "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [int(ExitCode.USAGE_ERROR)]},
            },
            {
                "action": "FailJob",
                "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [int(ExitCode.DIVERGED)]},
            },
            {
                "action": "FailJob",
                "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [int(ExitCode.PREEMPTED)]},
            },
            {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]
    }


def failure_policy(job: JobConfig) -> dict[str, Any]:
    """Return the JobSet failurePolicy; the first matching rule wins."""
    return {
        "maxRestarts": job.retry.max_restarts,
        "restartStrategy": "BlockingRecreate",
        "rules": [
            {
                "name": "user-error",
                "action": "FailJobSet",
                "onJobFailureReasons": ["PodFailurePolicy"],
                "onJobFailureMessagePatterns": [USER_ERROR_MESSAGE],
            },
            {
                "name": "diverged",
                "action": "FailJobSet",
                "onJobFailureReasons": ["PodFailurePolicy"],
                "onJobFailureMessagePatterns": [DIVERGED_MESSAGE],
            },
            {
                "name": "preempted",
                "action": "RestartJobSetAndIgnoreMaxRestarts",
                "onJobFailureReasons": ["PodFailurePolicy"],
            },
            {
                "name": "failed",
                "action": "RestartJobSet",
                "onJobFailureReasons": ["BackoffLimitExceeded", "DeadlineExceeded"],
            },
        ],
    }


def build_cluster_training_runtime(job: JobConfig, name: str | None = None) -> dict[str, Any]:
    """Return the BAGEL ClusterTrainingRuntime: torch ML policy, restart rules, /dev/shm, pod security, priority."""
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",  # podFailurePolicy requires Never
        "securityContext": pod.pod_security_context(),
        "containers": [
            {
                "name": CONTAINER,
                "image": job.image,
                "imagePullPolicy": job.image_pull_policy,
                "command": pod.NODE_COMMAND,
                "securityContext": pod.container_security_context(),
                "volumeMounts": [{"name": pod.SHM_VOLUME, "mountPath": "/dev/shm"}],
            }
        ],
        "volumes": [pod.shm_volume(job)],
    }
    if job.scheduling.priority_class:
        pod_spec["priorityClassName"] = job.scheduling.priority_class
    scheduler = job.scheduling.scheduler_name or ("volcano" if job.scheduling.gang == "volcano" else "")
    if scheduler:
        pod_spec["schedulerName"] = scheduler

    spec: dict[str, Any] = {
        "mlPolicy": {"numNodes": 1, "torch": {}},
        "template": {
            "metadata": {"labels": {"app.kubernetes.io/name": "bagel-platform"}},
            "spec": {
                "failurePolicy": failure_policy(job),
                "replicatedJobs": [
                    {
                        "name": REPLICATED_JOB,
                        "template": {
                            "metadata": {"labels": {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}},
                            "spec": {
                                "backoffLimit": 0,
                                "podFailurePolicy": pod_failure_policy(),
                                "template": {"spec": pod_spec},
                            },
                        },
                    }
                ],
            },
        },
    }
    if job.scheduling.gang == "coscheduling":
        spec["podGroupPolicy"] = {"coscheduling": {"scheduleTimeoutSeconds": job.scheduling.schedule_timeout_s}}
    elif job.scheduling.gang == "volcano":
        spec["podGroupPolicy"] = {"volcano": {}}
    return {
        "apiVersion": API_VERSION,
        "kind": "ClusterTrainingRuntime",
        "metadata": {
            "name": name or job.runtime,
            "labels": {"trainer.kubeflow.org/framework": "torch", "app.kubernetes.io/name": "bagel-platform"},
        },
        "spec": spec,
    }


def build_trainjob(
    job: JobConfig, stage_run: pod.StageRun, grace_period_s: int, submission: int = 1
) -> dict[str, Any]:
    """Return the TrainJob of one stage; per-job pod settings travel as a runtime patch.

    Args:
        job: the validated `job:` section.
        stage_run: config, run, stage, storage and init_from of the stage.
        grace_period_s: terminationGracePeriodSeconds of the pods.
        submission: 1 for the first submission, counted up by the launcher (a label only).
    """
    labels = pod.labels(job, stage_run, submission)
    pod_spec: dict[str, Any] = {
        **pod.node_placement(job),
        "terminationGracePeriodSeconds": grace_period_s,
    }
    if job.service_account:
        pod_spec["serviceAccountName"] = job.service_account
    if job.config_map:
        pod_spec["volumes"] = [v for v in pod.volumes(job) if v["name"] == pod.CONFIG_VOLUME]
        pod_spec["containers"] = [
            {"name": CONTAINER, "volumeMounts": [m for m in pod.volume_mounts(job) if m["name"] == pod.CONFIG_VOLUME]}
        ]

    spec: dict[str, Any] = {
        "runtimeRef": {"name": job.runtime, "apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime"},
        "trainer": {
            "image": job.image,
            "command": pod.NODE_COMMAND,
            "args": pod.train_args(job, stage_run),
            "env": pod.env(job),
            "numNodes": job.nodes,
            "numProcPerNode": job.procs,
            "resourcesPerNode": pod.resources(job),
        },
        "runtimePatches": [
            {
                "manager": pod.MANAGER,
                "trainingRuntimeSpec": {
                    "template": {
                        "metadata": {"labels": labels},
                        "spec": {
                            "replicatedJobs": [
                                {
                                    "name": REPLICATED_JOB,
                                    "template": {
                                        "metadata": {"labels": labels},
                                        "spec": {"template": {"metadata": {"labels": labels}, "spec": pod_spec}},
                                    },
                                }
                            ]
                        },
                    }
                },
            }
        ],
    }
    if job.active_deadline_s:
        spec["activeDeadlineSeconds"] = job.active_deadline_s
    return {
        "apiVersion": API_VERSION,
        "kind": "TrainJob",
        "metadata": {
            "name": pod.job_name(stage_run.run, stage_run.stage),
            "namespace": job.namespace,
            "labels": {**labels, **pod.queue_labels(job)},
        },
        "spec": spec,
    }

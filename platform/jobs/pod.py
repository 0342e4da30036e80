"""Pieces shared by the TrainJob and PyTorchJob specs: names, labels, command, env, volumes."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from bagel.platform.jobs.config import JobConfig
from bagel.platform.layout import validate_run_name, validate_stage

LABEL_PREFIX = "bagel.platform"
RUN_LABEL = f"{LABEL_PREFIX}/run"
STAGE_LABEL = f"{LABEL_PREFIX}/stage"
ATTEMPT_LABEL = f"{LABEL_PREFIX}/submission"
MANAGER = f"{LABEL_PREFIX}/launcher"
CONFIG_MOUNT = "/etc/bagel/configs"
SHM_VOLUME = "dshm"
CONFIG_VOLUME = "stage-configs"
# Job names also prefix pod names (`<job>-node-0-0-xxxxx`), so they stay well below 63 characters.
MAX_JOB_NAME = 40


@dataclass(frozen=True)
class StageRun:
    """The work of one job: a stage config with the run identity passed as overrides."""

    config: str
    """Packaged config name (tiny/pretrain) or YAML path on the launching machine."""

    run: str
    """Run name (DNS-1123 label)."""

    stage: str
    """alignment, pretrain, continued or sft."""

    storage: str
    """URI root of the run's files (s3://bucket/prefix)."""

    init_from: str = ""
    """URI of the promoted checkpoint to start from; "" starts fresh or resumes the run's own checkpoint."""

    overrides: tuple[str, ...] = field(default_factory=tuple)
    """More key=value overrides of the stage config, passed on to `bagel train`."""

    def __post_init__(self) -> None:
        validate_run_name(self.run)
        validate_stage(self.stage)


def job_name(run: str, stage: str) -> str:
    """Return the deterministic job name of (run, stage), an RFC-1035 label of at most 40 characters.

    The name never changes between submissions, so a restarted launcher finds
    the job it created before instead of starting a second one.
    """
    name = f"{run}-{stage}"
    if name[0].isdigit():
        name = f"b-{name}"
    if len(name) <= MAX_JOB_NAME:
        return name
    digest = hashlib.sha256(f"{run}/{stage}".encode()).hexdigest()[:8]
    head = name[: MAX_JOB_NAME - len(stage) - len(digest) - 2].rstrip("-")
    return f"{head}-{stage}-{digest}"


def labels(job: JobConfig, stage_run: StageRun, submission: int) -> dict[str, str]:
    """Return the labels that tie the job and its pods to the run, the stage and the submission number."""
    return {
        **job.labels,
        "app.kubernetes.io/name": "bagel-platform",
        "app.kubernetes.io/component": "training",
        RUN_LABEL: stage_run.run,
        STAGE_LABEL: stage_run.stage,
        ATTEMPT_LABEL: str(submission),
    }


def pod_config_path(job: JobConfig, config: str) -> str:
    """Return the config argument inside the pod: the mounted ConfigMap file or the packaged name."""
    if job.config_map and config.endswith((".yaml", ".yml")):
        return f"{CONFIG_MOUNT}/{PurePosixPath(config).name}"
    return config


# The container command: torchrun (configured by the operator's PET_* variables) under a
# wrapper that passes the trainer's exit code (75 preempted, 2 user error) on to Kubernetes.
NODE_COMMAND = ["python", "-m", "bagel.platform.launch.node", "--"]


def run_overrides(stage_run: StageRun) -> list[str]:
    """Return the run.* overrides of a stage.

    An empty init_from is left out because omegaconf reads `run.init_from=`
    as null. The trainer then uses the config's own value, which plan_stage
    already copied into `stage_run.init_from`.
    """
    overrides = [f"run.name={stage_run.run}", f"run.stage={stage_run.stage}", f"run.storage={stage_run.storage}"]
    if stage_run.init_from:
        overrides.append(f"run.init_from={stage_run.init_from}")
    return overrides


def train_args(job: JobConfig, stage_run: StageRun, config: str | None = None) -> list[str]:
    """Return the `bagel` arguments each rank runs: `train --config ... run.*=...` plus the overrides.

    `config` replaces the config argument (the local backend passes the path on this machine).
    """
    config = config if config is not None else pod_config_path(job, stage_run.config)
    return ["train", "--config", config, *run_overrides(stage_run), *stage_run.overrides]


def env(job: JobConfig) -> list[dict[str, Any]]:
    """Return the container environment; credentials come only from secretKeyRef entries."""
    values = {"PYTHONUNBUFFERED": "1", **job.env, **job.storage_env}
    variables: list[dict[str, Any]] = [{"name": name, "value": str(value)} for name, value in sorted(values.items())]
    if job.storage_secret:
        for key in job.storage_secret_keys:
            variables.append(
                {"name": key, "valueFrom": {"secretKeyRef": {"name": job.storage_secret, "key": key}}}
            )
    return variables


def resources(job: JobConfig) -> dict[str, Any]:
    """Return the per-pod ResourceRequirements (GPUs and extra devices as equal requests and limits)."""
    limits: dict[str, str] = {"memory": job.memory, **{k: str(v) for k, v in job.extra_resources.items()}}
    requests: dict[str, str] = {"cpu": job.cpu, "memory": job.memory}
    if job.gpus_per_node:
        limits["nvidia.com/gpu"] = str(job.gpus_per_node)
        requests["nvidia.com/gpu"] = str(job.gpus_per_node)
    return {"requests": requests, "limits": limits}


def shm_volume(job: JobConfig) -> dict[str, Any]:
    return {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": job.shm_size}}


def volumes(job: JobConfig) -> list[dict[str, Any]]:
    result = [shm_volume(job)]
    if job.config_map:
        result.append({"name": CONFIG_VOLUME, "configMap": {"name": job.config_map}})
    return result


def volume_mounts(job: JobConfig) -> list[dict[str, Any]]:
    result = [{"name": SHM_VOLUME, "mountPath": "/dev/shm"}]
    if job.config_map:
        result.append({"name": CONFIG_VOLUME, "mountPath": CONFIG_MOUNT, "readOnly": True})
    return result


def container_security_context() -> dict[str, Any]:
    """Return the training container's securityContext: non-root, no privilege escalation, no capabilities.

    The root filesystem stays writable because torch.compile, Triton and NCCL
    write caches under the home and temporary directories.
    """
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True}


def pod_security_context() -> dict[str, Any]:
    # 1000 is the `bagel` user of the repository's Dockerfile.
    return {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000, "seccompProfile": {"type": "RuntimeDefault"}}


def node_placement(job: JobConfig) -> dict[str, Any]:
    """Return the pod-spec fields that pick nodes: nodeSelector, tolerations, affinity (only those set)."""
    placement: dict[str, Any] = {}
    if job.node_pool.node_selector:
        placement["nodeSelector"] = dict(job.node_pool.node_selector)
    if job.node_pool.tolerations:
        placement["tolerations"] = [dict(t) for t in job.node_pool.tolerations]
    if job.node_pool.affinity:
        placement["affinity"] = dict(job.node_pool.affinity)
    return placement


def queue_labels(job: JobConfig) -> dict[str, str]:
    """Return the Kueue labels of the job object (queue and, with Kueue, the workload priority)."""
    if not job.scheduling.kueue_queue:
        return {}
    return {"kueue.x-k8s.io/queue-name": job.scheduling.kueue_queue}

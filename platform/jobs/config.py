"""The `job:` section of a stage config: where and how a stage runs on Kubernetes.

Example (values are the defaults unless marked):

    job:
      kind: TrainJob            # or PyTorchJob for clusters with the v1 training-operator
      namespace: bagel
      nodes: 4                  # example
      gpus_per_node: 8
      image: ghcr.io/bagel-platform/bagel-train:0.1.0
      node_pool:
        node_selector: {nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}   # example
      scheduling:
        kueue_queue: gpu-queue  # example
        priority_class: bagel-training

The section is validated here (unknown keys and wrong types raise `ConfigError`
naming the key), never by the trainer, which ignores it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from bagel.platform.config import ConfigError, build_dataclass

JOB_KINDS = ("TrainJob", "PyTorchJob")
GANG_SCHEDULERS = ("none", "coscheduling", "volcano")
_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|M|G|T)?$")


def _gpu_tolerations() -> list[dict[str, Any]]:
    return [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


@dataclass
class NodePoolConfig:
    """Node selection of the training pods."""

    node_selector: dict[str, str] = field(default_factory=dict)
    """Pod nodeSelector, e.g. {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "cloud.google.com/gke-spot": "true"}."""

    tolerations: list[dict[str, Any]] = field(default_factory=_gpu_tolerations)
    """Pod tolerations (core/v1 Toleration objects); the default tolerates the usual nvidia.com/gpu NoSchedule taint."""

    affinity: dict[str, Any] = field(default_factory=dict)
    """Pod affinity (core/v1 Affinity object); {} sets none."""


@dataclass
class SchedulingConfig:
    """Queueing, gang scheduling and priority."""

    kueue_queue: str = ""
    """Kueue LocalQueue name; sets the kueue.x-k8s.io/queue-name label so Kueue admits the whole job at once."""

    gang: str = "none"
    """Gang scheduling without Kueue: "none", "coscheduling" (scheduler-plugins) or "volcano"."""

    scheduler_name: str = ""
    """Pod schedulerName ("" keeps the cluster default; volcano gang scheduling uses "volcano")."""

    schedule_timeout_s: int = 600
    """Seconds the gang scheduler waits for the whole pod group before giving up."""

    priority_class: str = ""
    """PriorityClass of the pods ("" for the cluster default); the chart creates bagel-training and bagel-low.

    Only PyTorchJob pods get it. A TrainJob's pods take the priorityClassName
    of the ClusterTrainingRuntime, which the chart sets from
    `runtime.priorityClassName`: use a runtime with another PriorityClass
    (job.runtime) to change it.
    """

    pending_timeout_s: float = 900.0
    """Seconds `bagel launch` waits for all pods to be scheduled before it calls the job unschedulable."""


@dataclass
class RetryConfig:
    """How often a stage is restarted, in place by the job controller and by resubmission from `bagel launch`."""

    max_restarts: int = 3
    """In-place restarts of the whole job after ordinary failures (crash, OOM); preemption restarts are not counted.

    It does not reach a cluster's jobs. A TrainJob restarts up to the
    `maxRestarts` of its ClusterTrainingRuntime (the chart's
    `runtime.maxRestarts`). A PyTorchJob carries it as `runPolicy.backoffLimit`,
    which the operator does not apply to `restartPolicy: ExitCode` pods.
    """

    max_submissions: int = 5
    """Submissions of the job by `bagel launch` (the first one included) after preemption or unschedulability."""

    backoff_s: float = 30.0
    """Seconds before the first resubmission; doubles for each further one."""

    backoff_max_s: float = 600.0
    """Upper limit of the resubmission delay in seconds."""


@dataclass
class JobConfig:
    """Launch settings of one training stage."""

    kind: str = "TrainJob"
    """ "TrainJob" (Kubeflow Trainer v2.3, the default) or "PyTorchJob" (training-operator v1)."""

    namespace: str = "default"
    """Namespace of the job; the chart's ServiceAccount and Role live there."""

    nodes: int = 1
    """Number of pods (one per node)."""

    gpus_per_node: int = 8
    """nvidia.com/gpu per pod; also torchrun's processes per node. 0 runs on CPU with one process per pod."""

    procs_per_node: int = 0
    """torchrun processes per pod; 0 uses gpus_per_node (or 1 without GPUs)."""

    image: str = "ghcr.io/bagel-platform/bagel-train:0.1.0"
    """Training image (the repository's Dockerfile)."""

    image_pull_policy: str = "IfNotPresent"
    """Kubernetes imagePullPolicy of the training container."""

    runtime: str = "bagel-torch"
    """ClusterTrainingRuntime that a TrainJob references (the chart installs it)."""

    cpu: str = "32"
    """CPU request per pod (a Kubernetes quantity)."""

    memory: str = "512Gi"
    """Memory request and limit per pod (a Kubernetes quantity)."""

    shm_size: str = "64Gi"
    """Size limit of the memory-backed /dev/shm; DataLoader workers exchange batches through it."""

    extra_resources: dict[str, str] = field(default_factory=dict)
    """More per-pod resource limits, e.g. {"vpc.amazonaws.com/efa": "32"} for AWS EFA."""

    service_account: str = "bagel-training"
    """ServiceAccount of the training pods ("" for the namespace default)."""

    storage_secret: str = "bagel-storage"
    """Existing Secret with the object-store credentials (keys listed in storage_secret_keys); "" mounts none."""

    storage_secret_keys: list[str] = field(
        default_factory=lambda: ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]
    )
    """Keys of storage_secret exposed as environment variables of the same name."""

    storage_env: dict[str, str] = field(default_factory=dict)
    """Non-secret storage settings, e.g. {"AWS_ENDPOINT_URL": "https://s3.example.com", "AWS_DEFAULT_REGION": "us-east-1"}."""

    env: dict[str, str] = field(
        default_factory=lambda: {
            "NCCL_DEBUG": "WARN",
            "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
            "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": "600",
        }
    )
    """More environment variables (NCCL and PyTorch watchdog knobs, so a hung collective becomes an exit)."""

    config_map: str = ""
    """ConfigMap holding stage configs, mounted at /etc/bagel/configs; "" uses the configs packaged in the image."""

    grace_period_s: int = 0
    """terminationGracePeriodSeconds; 0 derives it from the trainer's preemption deadline plus grace_margin_s."""

    grace_margin_s: int = 30
    """Seconds added to the checkpoint deadline for process start-up and upload tails."""

    active_deadline_s: int = 0
    """Wall-clock limit of one submission in seconds; 0 sets none."""

    labels: dict[str, str] = field(default_factory=dict)
    """More labels for the job and its pods."""

    node_pool: NodePoolConfig = field(default_factory=NodePoolConfig)
    """Node selection."""

    scheduling: SchedulingConfig = field(default_factory=SchedulingConfig)
    """Queueing, gang scheduling and priority."""

    retry: RetryConfig = field(default_factory=RetryConfig)
    """Restart and resubmission budget."""

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid field and a valid value."""
        if self.kind not in JOB_KINDS:
            raise ConfigError(f"job.kind={self.kind!r} is invalid: use one of {', '.join(JOB_KINDS)}")
        if not _DNS_LABEL.match(self.namespace):
            raise ConfigError(f"job.namespace={self.namespace!r} is invalid: use a DNS-1123 label such as 'bagel'")
        if self.nodes < 1:
            raise ConfigError(f"job.nodes={self.nodes} is invalid: use an integer >= 1")
        if self.gpus_per_node < 0 or self.procs_per_node < 0:
            raise ConfigError(
                f"job.gpus_per_node={self.gpus_per_node} and job.procs_per_node={self.procs_per_node} must be >= 0"
            )
        if not self.image:
            raise ConfigError("job.image is empty: name the training image, e.g. ghcr.io/ORG/bagel-train:TAG")
        if self.image_pull_policy not in ("Always", "IfNotPresent", "Never"):
            raise ConfigError(f"job.image_pull_policy={self.image_pull_policy!r} is invalid: use Always, IfNotPresent or Never")
        for name in ("cpu", "memory", "shm_size"):
            if not _QUANTITY.match(getattr(self, name)):
                raise ConfigError(f"job.{name}={getattr(self, name)!r} is not a Kubernetes quantity: write e.g. 32, 500m or 64Gi")
        for key, value in self.extra_resources.items():
            if not _QUANTITY.match(str(value)):
                raise ConfigError(f"job.extra_resources.{key}={value!r} is not a Kubernetes quantity")
        if self.kind == "TrainJob" and not _DNS_LABEL.match(self.runtime):
            raise ConfigError(f"job.runtime={self.runtime!r} is invalid: name a ClusterTrainingRuntime such as 'bagel-torch'")
        if self.grace_period_s < 0 or self.grace_margin_s < 0 or self.active_deadline_s < 0:
            raise ConfigError("job.grace_period_s, job.grace_margin_s and job.active_deadline_s must be >= 0")
        if self.scheduling.gang not in GANG_SCHEDULERS:
            raise ConfigError(
                f"job.scheduling.gang={self.scheduling.gang!r} is invalid: use one of {', '.join(GANG_SCHEDULERS)}"
            )
        if self.scheduling.gang != "none" and self.scheduling.kueue_queue:
            raise ConfigError(
                "job.scheduling.gang and job.scheduling.kueue_queue are both set: Kueue already admits the job "
                "as a whole, so set job.scheduling.gang=none"
            )
        if self.scheduling.pending_timeout_s <= 0 or self.scheduling.schedule_timeout_s < 1:
            raise ConfigError("job.scheduling.pending_timeout_s must be > 0 and schedule_timeout_s >= 1")
        retry = self.retry
        if retry.max_restarts < 0 or retry.max_submissions < 1 or retry.backoff_s < 0 or retry.backoff_max_s < 0:
            raise ConfigError(
                f"job.retry: max_restarts={retry.max_restarts} must be >= 0, max_submissions={retry.max_submissions} >= 1, "
                f"backoff_s={retry.backoff_s} and backoff_max_s={retry.backoff_max_s} >= 0"
            )
        reserved = {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"}
        clash = sorted(reserved & (set(self.env) | set(self.storage_env)))
        if clash:
            raise ConfigError(f"job.env sets {clash[0]}: the job controller owns the PET_* torchrun variables, remove it")

    @property
    def procs(self) -> int:
        """torchrun processes per pod."""
        if self.procs_per_node:
            return self.procs_per_node
        return self.gpus_per_node or 1

    def grace_period(self, stage_config: dict[str, Any] | None) -> int:
        """Return terminationGracePeriodSeconds: the trainer's preemption deadline plus a margin.

        After SIGTERM the trainer saves a checkpoint for at most its
        preemption deadline and then exits. The pod must live at least that
        long, or the kubelet kills it in the middle of the upload. The deadline
        is the trainer's own `preemption.deadline_seconds` (RunConfig.preemption,
        a `PreemptionConfig`), built from the stage config's `preemption`
        section exactly as `bagel train` builds it, defaults included.
        """
        if self.grace_period_s:
            return self.grace_period_s
        from bagel.platform.preemption import PreemptionConfig

        section = (stage_config or {}).get("preemption")
        preemption = build_dataclass(PreemptionConfig, section, "preemption")
        return math.ceil(preemption.deadline_seconds) + self.grace_margin_s


def job_config_from_dict(section: dict[str, Any] | None) -> JobConfig:
    """Build and validate the `job:` section; unknown keys and wrong types raise ConfigError."""
    config = build_dataclass(JobConfig, section or {}, "job")
    config.validate()
    return config

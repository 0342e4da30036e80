"""`bagel launch` on Kubernetes: submit a stage's job, watch it, classify the end, resubmit, clean up.

One submission:
  create the job, named after the run and stage (a restarted launcher re-attaches
  to a live job of the same run and stage instead of starting a second one)
  -> watch the job object and poll its pods
  -> stream the rank-0 pod's log
  -> end on a terminal condition, a Kueue eviction or the pending deadline
  -> delete the job (foreground) and wait until its pods are gone, so no GPU stays held.

Preempted and unschedulable submissions are resubmitted under the same run and
stage, so training resumes from the run's checkpoint. Resubmissions back off
exponentially, up to `job.retry.max_submissions`. User errors and other
failures end the launch.
Ctrl-C (KeyboardInterrupt, or SIGTERM turned into one by the CLI) deletes the job.
"""

from __future__ import annotations

import logging
import queue
import time
from dataclasses import dataclass
from typing import Any, Callable, TextIO

from bagel.platform.exit_codes import UsageError
from bagel.platform.jobs import pod as pod_spec
from bagel.platform.jobs.build import StagePlan
from bagel.platform.launch.logs import LogFollower
from bagel.platform.launch.outcome import (
    LaunchResult,
    Outcome,
    classify_finished,
    is_pod_pending,
    job_phase,
    pending_reason,
    strip_torchrun_report,
)
from bagel.platform.launch.watch import GONE, ObjectWatch

logger = logging.getLogger(__name__)

# kind -> (group, version, plural, training container name)
RESOURCES = {
    "TrainJob": ("trainer.kubeflow.org", "v1alpha1", "trainjobs", "node"),
    "PyTorchJob": ("kubeflow.org", "v1", "pytorchjobs", "pytorch"),
}


@dataclass
class ClusterOptions:
    """Timing of the Kubernetes launcher (production defaults; tests shorten them)."""

    watch_timeout_s: float = 60.0
    """Server-side timeout of one watch request; the watch reconnects after it."""

    poll_interval_s: float = 10.0
    """Seconds between pod checks while the job object does not change."""

    cleanup_timeout_s: float = 300.0
    """Seconds to wait for the job's pods to disappear after deleting it."""

    stream_logs: bool = True
    """Print the rank-0 pod's log lines."""

    restart_grace_s: float = 120.0
    """Seconds to wait for new pods after every pod of an active job is gone, before calling it PodsLost.

    The job's own controller restarts it in place after a preemption. A TrainJob's
    JobSet deletes every pod, then creates new ones. A PyTorchJob recreates pods
    after a signal exit. Without the wait, the launcher would resubmit a job that
    is already restarting.
    """


class JobConflictError(UsageError):
    """A job with the launcher's name exists but belongs to another run or stage; it is left alone."""


def backoff_delay(submission: int, base_s: float, max_s: float) -> float:
    """Return the wait before submission number `submission + 1`: base * 2^(submission-1), at most max_s."""
    return min(base_s * (2 ** (submission - 1)), max_s)


class ClusterLauncher:
    """Run one stage as a Kubernetes job until it succeeds, fails for good or spends its budget."""

    def __init__(
        self,
        plan: StagePlan,
        api_client: Any,
        options: ClusterOptions | None = None,
        out: TextIO | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        from kubernetes import client

        self.plan = plan
        self.options = options or ClusterOptions()
        self._api_client = api_client
        self._custom = client.CustomObjectsApi(api_client)
        self._core = client.CoreV1Api(api_client)
        self._out = out
        self._sleep = sleep
        self.group, self.version, self.plural, self.container = RESOURCES[plan.job.kind]
        self.namespace = plan.job.namespace
        self.name = pod_spec.job_name(plan.stage_run.run, plan.stage_run.stage)
        self.submission = 0
        self._watch: ObjectWatch | None = None
        self._log: LogFollower | None = None
        # True once the job under this name is ours (created, or re-attached by run and stage labels).
        self._owns_job = False

    # Public API.

    def launch(self) -> LaunchResult:
        """Submit and watch until the stage ends; returns the last submission's result."""
        retry = self.plan.job.retry
        result: LaunchResult | None = None
        try:
            for submission in range(1, retry.max_submissions + 1):
                self.submission = submission
                result = self._run_submission(submission)
                result.submissions = submission
                logger.info("%s submission %d/%d ended: %s", self.name, submission, retry.max_submissions, result.describe())
                self._cleanup()
                if not result.retryable:
                    return result
                if submission < retry.max_submissions:
                    delay = backoff_delay(submission, retry.backoff_s, retry.backoff_max_s)
                    logger.warning("%s was %s; resubmitting in %.0f s to resume from its checkpoint", self.name, result.outcome.value, delay)
                    self._sleep(delay)
            assert result is not None
            result.message = f"{result.message} (submission budget of {retry.max_submissions} spent)".strip()
            return result
        except BaseException:
            # Ctrl-C, pipeline cancellation or a crash of the launcher: never leave GPUs held.
            if self._owns_job:
                logger.warning("launcher stopped: deleting job %s/%s", self.namespace, self.name)
                try:
                    self._cleanup()
                except Exception as error:  # noqa: BLE001  # the original exception matters more
                    logger.error("cannot delete job %s/%s: %s; delete it by hand", self.namespace, self.name, error)
            raise

    # One submission.

    def _run_submission(self, submission: int) -> LaunchResult:
        job = self._create(submission)
        if job_phase(job) in ("succeeded", "failed"):
            return self._finish(job, self._pods())
        self._watch = ObjectWatch(
            self._api_client,
            self.group,
            self.version,
            self.plural,
            self.namespace,
            self.name,
            timeout_s=self.options.watch_timeout_s,
            resource_version=job.get("metadata", {}).get("resourceVersion"),
        ).start()
        try:
            return self._wait(job)
        finally:
            self._watch.stop()

    def _wait(self, job: dict[str, Any]) -> LaunchResult:
        assert self._watch is not None
        pending_since = time.monotonic()
        was_running = False
        pods_gone_since: float | None = None
        while True:
            pods = self._pods()
            phase = job_phase(job)
            if phase in ("succeeded", "failed"):
                return self._finish(job, pods)

            if any((p.get("status") or {}).get("phase") in ("Running", "Succeeded", "Failed") for p in pods):
                if not was_running:
                    logger.info("%s is running (%d pods)", self.name, len(pods))
                was_running = True
                self._follow_logs(pods)
            if was_running and not pods and phase == "active":
                # The watch may lag behind the pod list: read the job before concluding anything.
                job = self._custom.get_namespaced_custom_object(
                    self.group, self.version, self.namespace, self.plural, self.name, _request_timeout=60
                )
                phase = job_phase(job)
                if phase in ("succeeded", "failed"):
                    return self._finish(job, pods)
            if phase == "suspended" and was_running:
                return LaunchResult(Outcome.PREEMPTED, "KueueEvicted", self._eviction_message(job))
            if was_running and not pods:
                # Every pod vanished without a terminal condition: the job restarting in place, a node
                # loss or an external deletion. Only new pods within the grace period show a restart.
                if pods_gone_since is None:
                    pods_gone_since = time.monotonic()
                    logger.info(
                        "every pod of %s is gone while the job is active; waiting up to %.0f s for its restart",
                        self.name, self.options.restart_grace_s,
                    )
                elif time.monotonic() - pods_gone_since > self.options.restart_grace_s:
                    return LaunchResult(
                        Outcome.PREEMPTED, "PodsLost",
                        f"every pod of the running job disappeared and none came back within {self.options.restart_grace_s:.0f} s",
                    )
            elif pods_gone_since is not None and pods:
                logger.info("%s restarted in place with %d new pods", self.name, len(pods))
                pods_gone_since = None

            waiting = not was_running and (not pods or all(is_pod_pending(p) for p in pods))
            if waiting:
                waited = time.monotonic() - pending_since
                if waited > self.plan.job.scheduling.pending_timeout_s:
                    reason = "not admitted by Kueue" if phase == "suspended" else pending_reason(pods, self._events(pods))
                    return LaunchResult(
                        Outcome.UNSCHEDULABLE, "Unschedulable", f"pending for {waited:.0f} s: {reason}"
                    )
            try:
                change = self._watch.changes.get(timeout=self.options.poll_interval_s)
            except queue.Empty:
                continue
            if change is GONE:
                return LaunchResult(Outcome.FAILED, "JobDeleted", f"job {self.name} was deleted by someone else")
            job = change

    def _finish(self, job: dict[str, Any], pods: list[dict[str, Any]]) -> LaunchResult:
        tail: list[str] = []
        if self._log is not None:
            self._log.join(5)
            if self._log.lines_seen == 0:
                self._log.fetch_tail()
            tail = list(self._log.tail)
        elif pods:
            follower = LogFollower(self._api_client, self.namespace, pods[0]["metadata"]["name"], self.container, None)
            follower.fetch_tail()
            tail = list(follower.tail)
        return classify_finished(job, pods, strip_torchrun_report(tail))

    # Kubernetes calls.

    def _create(self, submission: int) -> dict[str, Any]:
        from kubernetes import client

        body = self.plan.job_object(submission)
        try:
            created = self._custom.create_namespaced_custom_object(
                self.group, self.version, self.namespace, self.plural, body, _request_timeout=60
            )
            logger.info("created %s %s/%s (submission %d)", self.plan.job.kind, self.namespace, self.name, submission)
            self._owns_job = True
            return created
        except client.ApiException as error:
            if error.status != 409:
                raise
        existing = self._custom.get_namespaced_custom_object(
            self.group, self.version, self.namespace, self.plural, self.name, _request_timeout=60
        )
        labels = existing.get("metadata", {}).get("labels") or {}
        same_stage = (
            labels.get(pod_spec.RUN_LABEL) == self.plan.stage_run.run
            and labels.get(pod_spec.STAGE_LABEL) == self.plan.stage_run.stage
        )
        if not same_stage:
            raise JobConflictError(
                f"{self.plan.job.kind} {self.namespace}/{self.name} exists but belongs to another run or stage "
                f"(labels {labels}); delete it or choose another run name"
            )
        if job_phase(existing) in ("active", "succeeded"):
            # A pipeline step that is retried finds its own job: wait for it instead of starting over.
            logger.info("re-attaching to the existing %s %s/%s", self.plan.job.kind, self.namespace, self.name)
            self._owns_job = True
            return existing
        logger.info("replacing the finished %s %s/%s", self.plan.job.kind, self.namespace, self.name)
        self._owns_job = True
        self._cleanup()
        return self._create(submission)

    def _pods(self) -> list[dict[str, Any]]:
        """Return this run and stage's pods (rank 0 first); labels are re-checked for servers that ignore selectors."""
        run, stage = self.plan.stage_run.run, self.plan.stage_run.stage
        listed = self._core.list_namespaced_pod(
            self.namespace,
            label_selector=f"{pod_spec.RUN_LABEL}={run},{pod_spec.STAGE_LABEL}={stage}",
            _request_timeout=60,
        )
        pods = []
        for item in listed.items:
            obj = self._api_client.sanitize_for_serialization(item)
            labels = obj.get("metadata", {}).get("labels") or {}
            if labels.get(pod_spec.RUN_LABEL) == run and labels.get(pod_spec.STAGE_LABEL) == stage:
                pods.append(obj)
        return sorted(pods, key=_rank_key)

    def _events(self, pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
        names = {p["metadata"]["name"] for p in pods} | {self.name}
        try:
            listed = self._core.list_namespaced_event(self.namespace, _request_timeout=60)
        except Exception as error:  # noqa: BLE001  # events only refine the message
            logger.info("cannot list events: %s", error)
            return []
        events = [self._api_client.sanitize_for_serialization(e) for e in listed.items]
        return [e for e in events if (e.get("involvedObject") or {}).get("name") in names]

    def _eviction_message(self, job: dict[str, Any]) -> str:
        """Return the Evicted condition of the job's Kueue Workload, or a generic message if none is readable."""
        from kubernetes import client

        message = "the job was suspended while running (Kueue eviction)"
        try:
            listed = self._custom.list_namespaced_custom_object(
                "kueue.x-k8s.io", "v1beta2", self.namespace, "workloads", _request_timeout=60
            )
        except client.ApiException as error:
            logger.info("cannot read Kueue workloads (HTTP %s); reporting a generic eviction", error.status)
            return message
        uid = (job.get("metadata") or {}).get("uid")
        for workload in listed.get("items", []):
            owners = (workload.get("metadata") or {}).get("ownerReferences") or []
            # The owner uid separates this submission's Workload from one left by an earlier submission.
            if not any(o.get("name") == self.name and o.get("kind") == self.plan.job.kind and o.get("uid") in (uid, None) for o in owners):
                continue
            for item in (workload.get("status") or {}).get("conditions") or []:
                if item.get("type") == "Evicted" and str(item.get("status")) == "True":
                    return f"Kueue evicted workload {workload['metadata']['name']}: {item.get('reason', '')}: {item.get('message', '')}"
        return message

    def _follow_logs(self, pods: list[dict[str, Any]]) -> None:
        if not self.options.stream_logs:
            return
        rank0 = pods[0]["metadata"]["name"]
        if self._log is not None and self._log.pod == rank0:
            return
        if (pods[0].get("status") or {}).get("phase") not in ("Running", "Succeeded", "Failed"):
            return
        self._log = LogFollower(self._api_client, self.namespace, rank0, self.container, self._out).start()

    def _cleanup(self) -> None:
        """Delete the job (foreground) and wait until its pods are gone."""
        from kubernetes import client

        self._log = None
        try:
            self._custom.delete_namespaced_custom_object(
                self.group, self.version, self.namespace, self.plural, self.name,
                propagation_policy="Foreground", _request_timeout=60,
            )
            logger.info("deleted %s %s/%s", self.plan.job.kind, self.namespace, self.name)
        except client.ApiException as error:
            if error.status != 404:
                logger.error("cannot delete %s %s/%s: HTTP %s %s", self.plan.job.kind, self.namespace, self.name, error.status, error.reason)
                return
        deadline = time.monotonic() + self.options.cleanup_timeout_s
        while True:
            job_gone = self._is_gone()
            pods = [p for p in self._pods() if not (p.get("metadata") or {}).get("deletionTimestamp")]
            if job_gone and not pods:
                return
            if time.monotonic() > deadline:
                logger.error(
                    "%d pods of %s still exist %.0f s after deleting the job: check the job controller",
                    len(pods), self.name, self.options.cleanup_timeout_s,
                )
                return
            time.sleep(0.5)

    def _is_gone(self) -> bool:
        from kubernetes import client

        try:
            self._custom.get_namespaced_custom_object(
                self.group, self.version, self.namespace, self.plural, self.name, _request_timeout=60
            )
        except client.ApiException as error:
            if error.status == 404:
                return True
            raise
        return False


def _rank_key(pod: dict[str, Any]) -> tuple[int, str]:
    """Sort key putting the rank-0 pod first (JobSet/Job completion index 0, or the PyTorchJob master)."""
    metadata = pod.get("metadata") or {}
    labels = metadata.get("labels") or {}
    annotations = metadata.get("annotations") or {}
    index = labels.get("batch.kubernetes.io/job-completion-index") or annotations.get("batch.kubernetes.io/job-completion-index")
    job_index = labels.get("jobset.sigs.k8s.io/job-index", "0")
    if labels.get("training.kubeflow.org/replica-type", "").lower() == "master":
        return (0, metadata.get("name", ""))
    if index is not None:
        return (0 if index == "0" and job_index == "0" else 1, metadata.get("name", ""))
    return (1, metadata.get("name", ""))

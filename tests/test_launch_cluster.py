"""`bagel launch` against a Kubernetes API stand-in over HTTP.

No real API server can run here, so the launcher talks to kmock's emulator on
127.0.0.1 (bagel.platform.launch.standin). A test driver thread plays the
job controller, the scheduler and the kubelet through the same HTTP API. It
creates the job's pods with the labels the controller would copy from the
template and moves them through their phases. It also writes the rank-0 log,
sets the job's conditions, and deletes pods once their job is gone.
"""

import _thread
import io
import signal
import subprocess
import sys
import threading
import time
from typing import Callable

import pytest
import yaml

from bagel.platform.exit_codes import ExitCode
from bagel.platform.jobs.build import StagePlan
from bagel.platform.jobs.config import job_config_from_dict
from bagel.platform.jobs.pod import RUN_LABEL, StageRun
from bagel.platform.launch.cluster import RESOURCES, ClusterLauncher, ClusterOptions, JobConflictError, backoff_delay
from bagel.platform.launch.outcome import Outcome
from bagel.platform.launch.standin import KubeStandIn

pytestmark = pytest.mark.timeout(120)

NAMESPACE = "bagel"
FAST = ClusterOptions(watch_timeout_s=2, poll_interval_s=0.2, cleanup_timeout_s=10, restart_grace_s=1.0)


@pytest.fixture(scope="module")
def standin():
    with KubeStandIn() as server:
        yield server


def make_plan(kind="TrainJob", run="run-a", **job_overrides):
    section = {
        "kind": kind,
        "namespace": NAMESPACE,
        "nodes": 2,
        "retry": {"max_submissions": 3, "backoff_s": 0.0},
        **job_overrides,
    }
    return StagePlan(
        stage_run=StageRun("tiny/pretrain", run, "pretrain", "s3://bucket/bagel"),
        job=job_config_from_dict(section),
        grace_period_s=60,
    )


class ClusterDriver:
    """Plays the job controller and kubelet for one run; `scenario(driver, job, submission)` scripts each submission."""

    def __init__(self, standin: KubeStandIn, plan: StagePlan, scenario: Callable) -> None:
        from kubernetes import client

        self.standin = standin
        self.plan = plan
        self.scenario = scenario
        api_client = standin.api_client()
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.group, self.version, self.plural, self.container = RESOURCES[plan.job.kind]
        self.name = ClusterLauncher(plan, api_client).name
        self.jobs_seen: list[dict] = []
        self.pods_created: list[str] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)
        assert not self.errors, self.errors

    # Operator helpers used by scenarios.

    def pod_labels(self, job: dict) -> dict:
        if self.plan.job.kind == "TrainJob":
            patch = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
            return dict(patch["template"]["spec"]["template"]["metadata"]["labels"])
        return dict(job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["metadata"]["labels"])

    def create_pods(self, job: dict, submission: int) -> list[str]:
        names = []
        for index in range(self.plan.job.nodes):
            name = f"{self.name}-node-0-{index}-s{submission}"
            labels = {**self.pod_labels(job), "batch.kubernetes.io/job-completion-index": str(index)}
            self.core.create_namespaced_pod(
                NAMESPACE,
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels},
                    "spec": {"containers": [{"name": self.container, "image": "bagel"}]},
                    "status": {"phase": "Pending"},
                },
            )
            names.append(name)
        self.pods_created.extend(names)
        return names

    def start(self, job: dict, submission: int, *rank0_lines: str) -> list[str]:
        """Create the job's pods, set them running, give rank 0 these log lines, and return the pod names."""
        pods = self.create_pods(job, submission)
        self.run_pods(pods)
        if rank0_lines:
            self.log(pods[0], *rank0_lines)
        return pods

    def set_pod(self, name: str, status: dict) -> None:
        self.core.patch_namespaced_pod_status(name, NAMESPACE, {"status": status})

    def run_pods(self, names: list[str]) -> None:
        for name in names:
            self.set_pod(
                name,
                {"phase": "Running", "conditions": [{"type": "PodScheduled", "status": "True"}]},
            )

    def terminate(self, name: str, exit_code: int, reason: str = "Error", extra: dict | None = None) -> None:
        status = {
            "phase": "Succeeded" if exit_code == 0 else "Failed",
            "containerStatuses": [
                {
                    "name": self.container,
                    "image": "bagel",
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "state": {"terminated": {"exitCode": exit_code, "reason": reason}},
                }
            ],
            **(extra or {}),
        }
        self.set_pod(name, status)

    def set_conditions(self, conditions: list[dict]) -> None:
        self.custom.patch_namespaced_custom_object_status(
            self.group, self.version, NAMESPACE, self.plural, self.name, {"status": {"conditions": conditions}}
        )

    def log(self, pod: str, *lines: str) -> None:
        self.standin.set_log_lines(NAMESPACE, pod, list(lines))

    def end_logs(self, pods: list[str]) -> None:
        for name in pods:
            self.standin.end_log(NAMESPACE, name)

    # The control loop.

    def _get_job(self):
        from kubernetes import client

        try:
            return self.custom.get_namespaced_custom_object(self.group, self.version, NAMESPACE, self.plural, self.name)
        except client.ApiException as error:
            if error.status == 404:
                return None
            raise

    def _collect_garbage(self) -> None:
        for pod in self.core.list_namespaced_pod(NAMESPACE).items:
            if (pod.metadata.labels or {}).get(RUN_LABEL) == self.plan.stage_run.run:
                self.core.delete_namespaced_pod(pod.metadata.name, NAMESPACE)

    def _loop(self) -> None:
        handled_uid = None
        try:
            while not self._stop.is_set():
                job = self._get_job()
                if job is None:
                    self._collect_garbage()
                elif job["metadata"]["uid"] != handled_uid:
                    handled_uid = job["metadata"]["uid"]
                    self.jobs_seen.append(job)
                    submission = int(job["metadata"]["labels"]["bagel.platform/submission"])
                    threading.Thread(target=self._play, args=(job, submission), daemon=True).start()
                time.sleep(0.05)
        except BaseException as error:  # reported by __exit__
            self.errors.append(error)

    def _play(self, job: dict, submission: int) -> None:
        try:
            self.scenario(self, job, submission)
        except BaseException as error:
            if self._get_job() is not None:  # errors after the launcher deleted the job are expected
                self.errors.append(error)


def run_to_success(driver: ClusterDriver, job: dict, submission: int) -> None:
    pods = driver.create_pods(job, submission)
    time.sleep(0.2)
    driver.run_pods(pods)
    driver.log(pods[0], "step 1 loss 5.0", "step 2 loss 4.0")
    driver.log(pods[1], "rank 1 line")
    time.sleep(0.3)
    for name in pods:
        driver.terminate(name, 0, reason="Completed")
    driver.end_logs(pods)
    driver.set_conditions([{"type": "Complete", "status": "True", "reason": "JobSetCompleted", "message": "done"}])


def launch(standin, plan, **kwargs):
    out = io.StringIO()
    launcher = ClusterLauncher(plan, standin.api_client(), options=kwargs.pop("options", FAST), out=out, **kwargs)
    return launcher, launcher.launch(), out.getvalue()


def remaining_pods(standin, run):
    from kubernetes import client

    core = client.CoreV1Api(standin.api_client())
    return [p.metadata.name for p in core.list_namespaced_pod(NAMESPACE).items if (p.metadata.labels or {}).get(RUN_LABEL) == run]


def job_exists(standin, plan):
    from kubernetes import client

    group, version, plural, _ = RESOURCES[plan.job.kind]
    try:
        client.CustomObjectsApi(standin.api_client()).get_namespaced_custom_object(
            group, version, NAMESPACE, plural, ClusterLauncher(plan, standin.api_client()).name
        )
    except client.ApiException as error:
        assert error.status == 404
        return False
    return True


@pytest.mark.parametrize("kind", ["TrainJob", "PyTorchJob"])
def test_success_streams_rank0_logs(standin, kind):
    plan = make_plan(kind=kind, run=f"ok-{kind.lower()}")
    with ClusterDriver(standin, plan, run_to_success) as driver:
        _, result, output = launch(standin, plan)
    assert result.outcome is Outcome.SUCCEEDED
    assert result.process_exit_code() == ExitCode.SUCCESS
    assert result.submissions == 1
    assert "step 2 loss 4.0" in output
    assert "rank 1 line" not in output
    assert driver.jobs_seen[0]["kind"] == kind
    assert not job_exists(standin, plan)
    assert remaining_pods(standin, plan.stage_run.run) == []


def test_preemption_mid_run_resubmits(standin):
    plan = make_plan(run="preempt")

    def scenario(driver, job, submission):
        if submission > 1:
            return run_to_success(driver, job, submission)
        pods = driver.create_pods(job, submission)
        driver.run_pods(pods)
        driver.log(pods[0], "step 7 loss 3.0")
        time.sleep(0.3)
        disruption = {
            "conditions": [
                {"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler", "message": "higher priority pod"}
            ]
        }
        driver.terminate(pods[1], 75, extra=disruption)
        driver.terminate(pods[0], 75)
        driver.end_logs(pods)
        driver.set_conditions([{"type": "Failed", "status": "True", "reason": "FailedJobs", "message": "restarts exhausted"}])

    with ClusterDriver(standin, plan, scenario) as driver:
        _, result, output = launch(standin, plan)
    assert result.outcome is Outcome.SUCCEEDED
    assert result.submissions == 2
    first, second = driver.jobs_seen
    assert first["metadata"]["name"] == second["metadata"]["name"]
    assert second["metadata"]["labels"]["bagel.platform/submission"] == "2"
    # The same run and stage, so the trainer resumes from the run's own checkpoint.
    assert first["spec"]["trainer"]["args"] == second["spec"]["trainer"]["args"]
    assert "step 7 loss 3.0" in output
    assert remaining_pods(standin, "preempt") == []


def delete_pods(driver: ClusterDriver, names: list[str]) -> None:
    for name in names:
        driver.core.delete_namespaced_pod(name, NAMESPACE)


def test_in_place_restart_is_not_resubmitted(standin):
    """The JobSet deletes every pod and creates new ones after a preemption: the launcher waits and follows them."""
    plan = make_plan(run="in-place")

    def scenario(driver, job, submission):
        pods = driver.start(job, submission, "step 3 loss 4.0")
        time.sleep(0.3)
        driver.end_logs(pods)
        delete_pods(driver, pods)
        time.sleep(0.5)  # shorter than restart_grace_s
        run_to_success(driver, job, submission + 10)  # new pod names, as a JobSet restart gives

    with ClusterDriver(standin, plan, scenario) as driver:
        _, result, output = launch(standin, plan)
    assert result.outcome is Outcome.SUCCEEDED
    assert result.submissions == 1
    assert len(driver.jobs_seen) == 1
    assert "step 3 loss 4.0" in output
    assert "step 2 loss 4.0" in output  # the restarted pods' log is followed too


def test_pods_lost_after_grace_resubmits(standin):
    plan = make_plan(run="pods-lost", retry={"max_submissions": 2, "backoff_s": 0.0})

    def scenario(driver, job, submission):
        if submission > 1:
            return run_to_success(driver, job, submission)
        pods = driver.start(job, submission)
        time.sleep(0.3)
        driver.end_logs(pods)
        delete_pods(driver, pods)

    with ClusterDriver(standin, plan, scenario) as driver:
        _, result, _ = launch(standin, plan)
    assert result.outcome is Outcome.SUCCEEDED
    assert result.submissions == 2


def test_preemption_budget_spent(standin):
    plan = make_plan(run="always-preempted", retry={"max_submissions": 2, "backoff_s": 0.0})

    def scenario(driver, job, submission):
        pods = driver.create_pods(job, submission)
        driver.run_pods(pods)
        time.sleep(0.2)
        driver.terminate(pods[0], 137, reason="Error", extra={"reason": "Evicted", "message": "node drained"})
        driver.end_logs(pods)
        driver.set_conditions([{"type": "Failed", "status": "True", "reason": "FailedJobs"}])

    with ClusterDriver(standin, plan, scenario) as driver:
        _, result, _ = launch(standin, plan)
    assert result.outcome is Outcome.PREEMPTED
    assert result.reason == "Evicted"
    assert result.submissions == 2
    assert "budget" in result.message
    assert len(driver.jobs_seen) == 2
    assert result.process_exit_code() == ExitCode.PREEMPTED


def test_user_error_fails_fast(standin):
    plan = make_plan(run="user-error")

    def scenario(driver, job, submission):
        pods = driver.start(job, submission, "ConfigError: unknown key optim.lrr in OptimConfig")
        time.sleep(0.2)
        for name in pods:
            driver.terminate(name, 2)
        driver.end_logs(pods)
        driver.set_conditions(
            [
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "FailedJobs",
                    "message": "Container node for pod bagel/x failed with exit code 2 matching FailJob rule at index 0",
                }
            ]
        )

    with ClusterDriver(standin, plan, scenario) as driver:
        _, result, _ = launch(standin, plan)
    assert result.outcome is Outcome.FAILED
    assert result.reason == "UserError"
    assert result.exit_code == 2
    assert result.process_exit_code() == ExitCode.USAGE_ERROR
    assert len(driver.jobs_seen) == 1
    assert any("optim.lrr" in line for line in result.log_tail)
    assert remaining_pods(standin, "user-error") == []


def test_oom_reported(standin):
    plan = make_plan(run="oom")

    def scenario(driver, job, submission):
        pods = driver.create_pods(job, submission)
        driver.run_pods(pods)
        time.sleep(0.2)
        driver.terminate(pods[1], 137, reason="OOMKilled")
        driver.end_logs(pods)
        driver.set_conditions([{"type": "Failed", "status": "True", "reason": "FailedJobs", "message": "maxRestarts"}])

    with ClusterDriver(standin, plan, scenario):
        _, result, _ = launch(standin, plan)
    assert result.outcome is Outcome.FAILED
    assert result.reason == "OOMKilled"
    assert result.submissions == 1


def test_never_scheduled(standin):
    plan = make_plan(
        run="no-gpus",
        retry={"max_submissions": 2, "backoff_s": 0.0},
        scheduling={"pending_timeout_s": 1.0},
    )
    message = "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."

    def scenario(driver, job, submission):
        for name in driver.create_pods(job, submission):
            driver.set_pod(
                name,
                {
                    "phase": "Pending",
                    "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}],
                },
            )

    with ClusterDriver(standin, plan, scenario) as driver:
        _, result, _ = launch(standin, plan)
    assert result.outcome is Outcome.UNSCHEDULABLE
    assert "Insufficient nvidia.com/gpu" in result.message
    assert result.submissions == 2
    assert len(driver.jobs_seen) == 2
    assert remaining_pods(standin, "no-gpus") == []
    assert not job_exists(standin, plan)


def test_dropped_watch_resumes(standin):
    plan = make_plan(run="drop-watch")
    dropped = []

    def scenario(driver, job, submission):
        pods = driver.create_pods(job, submission)
        driver.run_pods(pods)
        time.sleep(0.5)
        dropped.append(len(standin.watch_queries))
        assert driver.standin.drop_watches() >= 1
        time.sleep(0.2)
        for name in pods:
            driver.terminate(name, 0, reason="Completed")
        driver.end_logs(pods)
        driver.set_conditions([{"type": "Complete", "status": "True"}])

    with ClusterDriver(standin, plan, scenario):
        launcher, result, _ = launch(standin, plan, options=ClusterOptions(watch_timeout_s=30, poll_interval_s=30, cleanup_timeout_s=10))
    assert result.outcome is Outcome.SUCCEEDED
    # With a 30 s poll interval only the watch can have delivered the completion this fast.
    resumed = standin.watch_queries[dropped[0] :]
    assert resumed, "no watch request after the drop"
    assert all(query.get("resourceVersion") for query in resumed)
    assert resumed[0]["fieldSelector"] == f"metadata.name={launcher.name}"


def test_kueue_eviction_resubmits(standin):
    plan = make_plan(run="kueue-evicted", scheduling={"kueue_queue": "gpu"})

    def scenario(driver, job, submission):
        if submission > 1:
            return run_to_success(driver, job, submission)
        pods = driver.create_pods(job, submission)
        driver.run_pods(pods)
        time.sleep(0.3)
        driver.custom.create_namespaced_custom_object(
            "kueue.x-k8s.io", "v1beta2", NAMESPACE, "workloads",
            {
                "apiVersion": "kueue.x-k8s.io/v1beta2",
                "kind": "Workload",
                "metadata": {
                    "name": f"trainjob-{driver.name}-1",
                    "namespace": NAMESPACE,
                    "ownerReferences": [{"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob", "name": driver.name, "uid": job["metadata"]["uid"]}],
                },
                "status": {"conditions": [{"type": "Evicted", "status": "True", "reason": "Preempted", "message": "Preempted to accommodate a higher priority Workload"}]},
            },
        )
        # Kueue suspends the job; the job controller then deletes its pods.
        driver.set_conditions([{"type": "Suspended", "status": "True", "reason": "Suspended"}])
        for name in pods:
            driver.core.delete_namespaced_pod(name, NAMESPACE)

    with ClusterDriver(standin, plan, scenario) as driver:
        launcher = ClusterLauncher(plan, standin.api_client(), options=FAST, out=io.StringIO())
        first = launcher._run_submission(1)
        launcher._cleanup()
        assert first.outcome is Outcome.PREEMPTED
        assert first.reason == "KueueEvicted"
        assert "higher priority Workload" in first.message
        result = launcher._run_submission(2)
        launcher._cleanup()
    assert result.outcome is Outcome.SUCCEEDED
    assert driver.jobs_seen[0]["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu"


def test_interrupt_deletes_job(standin):
    plan = make_plan(run="ctrl-c")

    def scenario(driver, job, submission):
        pods = driver.create_pods(job, submission)
        driver.run_pods(pods)
        time.sleep(0.5)
        _thread.interrupt_main()

    with ClusterDriver(standin, plan, scenario):
        with pytest.raises(KeyboardInterrupt):
            launch(standin, plan)
    assert not job_exists(standin, plan)
    assert remaining_pods(standin, "ctrl-c") == []


def test_cli_sigterm_deletes_job(standin, tmp_path, write_stage_config):
    """Pipeline cancellation stops the launcher's pod with SIGTERM: `bagel launch` must delete its job."""
    config = tmp_path / "stage.yaml"
    write_stage_config(config, run={"name": "cancelled", "stage": "sft", "storage": "s3://bucket/x"}, job={"namespace": NAMESPACE})
    # The driver's view of the same job (the launcher in the subprocess builds its own from the file).
    plan = StagePlan(stage_run=StageRun(str(config), "cancelled", "sft", "s3://bucket/x"), job=make_plan().job, grace_period_s=60)

    def scenario(driver, job, submission):
        driver.run_pods(driver.create_pods(job, submission))

    with ClusterDriver(standin, plan, scenario) as driver:
        process = subprocess.Popen(
            [sys.executable, "-m", "bagel.platform", "launch", "--config", str(config), "--server", standin.url],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        deadline = time.monotonic() + 60
        while not driver.pods_created and time.monotonic() < deadline:
            time.sleep(0.2)
        assert driver.pods_created, "the launcher created no job"
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 130, output[-3000:]
    assert not job_exists(standin, plan)
    assert remaining_pods(standin, "cancelled") == []


def test_reattach_to_running_job(standin):
    plan = make_plan(run="reattach")
    from kubernetes import client

    group, version, plural, _ = RESOURCES["TrainJob"]
    client.CustomObjectsApi(standin.api_client()).create_namespaced_custom_object(
        group, version, NAMESPACE, plural, plan.job_object(1)
    )

    with ClusterDriver(standin, plan, run_to_success) as driver:
        _, result, _ = launch(standin, plan)
    assert result.outcome is Outcome.SUCCEEDED
    assert len(driver.jobs_seen) == 1


def test_foreign_job_left_alone(standin):
    plan = make_plan(run="owner-a")
    group, version, plural, _ = RESOURCES["TrainJob"]
    from kubernetes import client

    custom = client.CustomObjectsApi(standin.api_client())
    foreign = plan.job_object(1)
    foreign["metadata"]["labels"]["bagel.platform/run"] = "someone-else"
    custom.create_namespaced_custom_object(group, version, NAMESPACE, plural, foreign)
    with pytest.raises(JobConflictError, match="another run or stage"):
        launch(standin, plan)
    assert job_exists(standin, plan)
    custom.delete_namespaced_custom_object(group, version, NAMESPACE, plural, foreign["metadata"]["name"])


def test_backoff_doubles_and_caps():
    assert [backoff_delay(n, 30, 100) for n in (1, 2, 3, 4)] == [30, 60, 100, 100]

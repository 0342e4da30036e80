"""Job specs built from a stage config validate strictly and carry the restart, placement and storage rules."""

import copy
import math

import pytest
import yaml

from bagel.platform.config import ConfigError
from bagel.platform.exit_codes import ExitCode
from bagel.platform.jobs.build import plan_stage, split_overrides
from bagel.platform.jobs.config import job_config_from_dict
from bagel.platform.jobs.pod import StageRun, job_name
from bagel.platform.jobs.pod import env as pod_env
from bagel.platform.jobs.pytorchjob import build_pytorchjob
from bagel.platform.jobs.trainjob import DIVERGED_MESSAGE, USER_ERROR_MESSAGE, build_cluster_training_runtime, build_trainjob
from bagel.platform.jobs.validate import ValidationError, validate_object

STAGE_RUN = StageRun("tiny/pretrain", "run-a", "pretrain", "s3://bucket/bagel", init_from="s3://bucket/bagel/promoted/abc")

JOB_SECTIONS = {
    "defaults": {},
    "multi-node-kueue": {
        "nodes": 4,
        "gpus_per_node": 8,
        "scheduling": {"kueue_queue": "gpu-queue", "priority_class": "bagel-training"},
        "node_pool": {
            "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {"matchExpressions": [{"key": "karpenter.sh/capacity-type", "operator": "In", "values": ["spot"]}]}
                        ]
                    }
                }
            },
        },
        "extra_resources": {"vpc.amazonaws.com/efa": "32"},
        "config_map": "bagel-stage-configs",
        "active_deadline_s": 86400,
    },
    "volcano-cpu": {"nodes": 2, "gpus_per_node": 0, "scheduling": {"gang": "volcano"}, "storage_secret": ""},
    "coscheduling": {"nodes": 2, "scheduling": {"gang": "coscheduling", "schedule_timeout_s": 120}},
}


@pytest.fixture(params=sorted(JOB_SECTIONS))
def job(request):
    return job_config_from_dict(copy.deepcopy(JOB_SECTIONS[request.param]))


def test_trainjob_validates_strictly(job):
    validate_object(build_trainjob(job, STAGE_RUN, grace_period_s=120))


def test_runtime_validates_strictly(job):
    validate_object(build_cluster_training_runtime(job))


def test_pytorchjob_validates_strictly(job):
    validate_object(build_pytorchjob(job, STAGE_RUN, grace_period_s=120))


def test_unknown_field_rejected():
    job = job_config_from_dict({})
    trainjob = build_trainjob(job, STAGE_RUN, 120)
    # The v2.1 field name, pruned silently by an API server running Trainer v2.3.
    trainjob["spec"]["podTemplateOverrides"] = []
    with pytest.raises(ValidationError, match="podTemplateOverrides"):
        validate_object(trainjob)


def test_string_num_proc_rejected():
    trainjob = build_trainjob(job_config_from_dict({}), STAGE_RUN, 120)
    trainjob["spec"]["trainer"]["numProcPerNode"] = "auto"
    with pytest.raises(ValidationError, match="numProcPerNode"):
        validate_object(trainjob)


def test_core_kind_strict():
    with pytest.raises(ValidationError, match="replica"):
        validate_object({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"replica": 1}})


def test_trainjob_contents():
    job = job_config_from_dict(copy.deepcopy(JOB_SECTIONS["multi-node-kueue"]))
    trainjob = build_trainjob(job, STAGE_RUN, grace_period_s=150, submission=3)
    trainer = trainjob["spec"]["trainer"]
    assert trainer["command"] == ["python", "-m", "bagel.platform.launch.node", "--"]
    assert trainer["args"][:3] == ["train", "--config", "tiny/pretrain"]
    assert "run.name=run-a" in trainer["args"]
    assert "run.stage=pretrain" in trainer["args"]
    assert "run.storage=s3://bucket/bagel" in trainer["args"]
    assert "run.init_from=s3://bucket/bagel/promoted/abc" in trainer["args"]
    assert trainer["numNodes"] == 4
    assert trainer["numProcPerNode"] == 8
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "8"
    assert trainer["resourcesPerNode"]["limits"]["vpc.amazonaws.com/efa"] == "32"
    secret_env = [e for e in trainer["env"] if "valueFrom" in e]
    assert {e["name"] for e in secret_env} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert all(e["valueFrom"]["secretKeyRef"]["name"] == "bagel-storage" for e in secret_env)
    assert not any("SECRET" in e["name"] and "value" in e for e in trainer["env"])
    labels = trainjob["metadata"]["labels"]
    assert labels["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert labels["bagel.platform/run"] == "run-a"
    assert labels["bagel.platform/stage"] == "pretrain"
    assert labels["bagel.platform/submission"] == "3"
    patch_pod = trainjob["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
        "template"
    ]["spec"]["template"]["spec"]
    assert patch_pod["terminationGracePeriodSeconds"] == 150
    assert patch_pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert patch_pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "nodeAffinity" in patch_pod["affinity"]
    assert patch_pod["volumes"][0]["configMap"]["name"] == "bagel-stage-configs"


def test_runtime_restart_rules():
    job = job_config_from_dict({"retry": {"max_restarts": 2}, "scheduling": {"priority_class": "bagel-training"}})
    runtime = build_cluster_training_runtime(job)
    jobset = runtime["spec"]["template"]["spec"]
    rules = {rule["name"]: rule for rule in jobset["failurePolicy"]["rules"]}
    assert jobset["failurePolicy"]["maxRestarts"] == 2
    assert rules["user-error"]["action"] == "FailJobSet"
    assert rules["preempted"]["action"] == "RestartJobSetAndIgnoreMaxRestarts"
    assert rules["diverged"]["action"] == "FailJobSet"
    assert [r["name"] for r in jobset["failurePolicy"]["rules"]] == ["user-error", "diverged", "preempted", "failed"]
    child = jobset["replicatedJobs"][0]["template"]["spec"]
    pod_rules = child["podFailurePolicy"]["rules"]
    # The user-error and diverged JobSet rules match the messages of podFailurePolicy rules 0 and 1.
    assert pod_rules[0]["onExitCodes"]["values"] == [int(ExitCode.USAGE_ERROR)]
    assert "exit code 2 matching FailJob rule at index 0" in USER_ERROR_MESSAGE
    assert rules["user-error"]["onJobFailureMessagePatterns"] == [USER_ERROR_MESSAGE]
    assert pod_rules[1]["onExitCodes"]["values"] == [int(ExitCode.DIVERGED)]
    assert "exit code 3 matching FailJob rule at index 1" in DIVERGED_MESSAGE
    assert rules["diverged"]["onJobFailureMessagePatterns"] == [DIVERGED_MESSAGE]
    assert pod_rules[2]["onExitCodes"]["values"] == [int(ExitCode.PREEMPTED)]
    assert pod_rules[3]["onPodConditions"][0]["type"] == "DisruptionTarget"
    assert child["backoffLimit"] == 0
    pod_spec = child["template"]["spec"]
    assert pod_spec["restartPolicy"] == "Never"
    assert pod_spec["priorityClassName"] == "bagel-training"
    shm = pod_spec["volumes"][0]
    assert shm["emptyDir"]["medium"] == "Memory"
    assert pod_spec["containers"][0]["volumeMounts"][0]["mountPath"] == "/dev/shm"
    assert pod_spec["securityContext"]["runAsNonRoot"] is True


def test_pytorchjob_contents():
    job = job_config_from_dict({"nodes": 3, "gpus_per_node": 4, "scheduling": {"gang": "volcano"}})
    pytorchjob = build_pytorchjob(job, STAGE_RUN, grace_period_s=90)
    replicas = pytorchjob["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1
    assert replicas["Worker"]["replicas"] == 2
    assert replicas["Master"]["restartPolicy"] == "ExitCode"
    assert pytorchjob["spec"]["nprocPerNode"] == "4"
    assert pytorchjob["spec"]["runPolicy"]["cleanPodPolicy"] == "All"
    assert pytorchjob["spec"]["runPolicy"]["schedulingPolicy"]["minAvailable"] == 3
    container = replicas["Master"]["template"]["spec"]["containers"][0]
    assert container["name"] == "pytorch"
    assert replicas["Master"]["template"]["spec"]["terminationGracePeriodSeconds"] == 90


def test_single_node_pytorchjob_has_no_workers():
    pytorchjob = build_pytorchjob(job_config_from_dict({"kind": "PyTorchJob"}), STAGE_RUN, 90)
    assert list(pytorchjob["spec"]["pytorchReplicaSpecs"]) == ["Master"]


@pytest.mark.parametrize(
    "section, message",
    [
        ({"nodez": 2}, "unknown key job.nodez"),
        ({"nodes": "2"}, "job.nodes"),
        ({"nodes": 0}, "job.nodes=0"),
        ({"kind": "MPIJob"}, "job.kind"),
        ({"memory": "lots"}, "job.memory"),
        ({"scheduling": {"gang": "volcano", "kueue_queue": "q"}}, "kueue_queue"),
        ({"env": {"PET_NNODES": "2"}}, "PET_NNODES"),
        ({"node_pool": {"tolerations": "all"}}, "job.node_pool.tolerations"),
    ],
)
def test_job_section_errors(section, message):
    with pytest.raises(ConfigError, match=message):
        job_config_from_dict(section)


def test_job_name_bounded():
    long_run = "r" * 63
    name = job_name(long_run, "continued")
    assert len(name) <= 40
    assert name.split("-")[-1].isalnum()
    assert name != job_name("r" * 62, "continued")
    assert job_name("7run", "sft")[0].isalpha()


def test_plan_from_stage_config(tmp_path, write_stage_config):
    config = tmp_path / "stage.yaml"
    write_stage_config(
        config,
        run={"name": "cfg-run", "stage": "sft", "storage": "s3://bucket/x"},
        preemption={"deadline_seconds": 45},
        job={"nodes": 2, "kind": "PyTorchJob"},
    )
    plan = plan_stage(str(config), ["job.nodes=3", "optim.lr=1e-5", "run.name=ignored"], run="cli-run")
    assert plan.job.nodes == 3
    assert plan.stage_run.run == "cli-run"
    assert plan.stage_run.stage == "sft"
    assert plan.stage_run.overrides == ("optim.lr=1e-5",)
    assert plan.grace_period_s == 45 + plan.job.grace_margin_s
    obj = plan.job_object(submission=2)
    assert obj["kind"] == "PyTorchJob"
    validate_object(obj)


def grace_periods(obj) -> list:
    """Every terminationGracePeriodSeconds in a job object (pod templates of all replica types)."""
    if isinstance(obj, dict):
        found = [obj["terminationGracePeriodSeconds"]] if "terminationGracePeriodSeconds" in obj else []
        return found + [value for item in obj.values() for value in grace_periods(item)]
    if isinstance(obj, list):
        return [value for item in obj for value in grace_periods(item)]
    return []


@pytest.mark.parametrize("kind", ["TrainJob", "PyTorchJob"])
def test_grace_period_follows_trainer_deadline(kind):
    """The pods' grace period follows the field the trainer reads (RunConfig.preemption.deadline_seconds)."""
    from bagel.platform.config import load_run_config
    from bagel.platform.preemption import PreemptionConfig

    plans = {
        deadline: plan_stage("tiny/pretrain", [f"job.kind={kind}", "job.grace_margin_s=10", *overrides], run="grace", storage="s3://b/x")
        for deadline, overrides in [
            (PreemptionConfig().deadline_seconds, []),
            (100.5, ["preemption.deadline_seconds=100.5"]),
            (7, ["preemption.deadline_seconds=7"]),
        ]
    }
    for deadline, plan in plans.items():
        assert plan.grace_period_s == math.ceil(deadline) + 10
        periods = grace_periods(plan.job_object())
        assert periods and set(periods) == {math.ceil(deadline) + 10}, (kind, periods)
    # The same override reaches the trainer's own config field.
    trainer_config = load_run_config("tiny/pretrain", ["preemption.deadline_seconds=7"])
    assert trainer_config.preemption.deadline_seconds == 7
    # A misspelt field fails instead of falling back to the default deadline.
    with pytest.raises(ConfigError, match="deadline_second"):
        plan_stage("tiny/pretrain", ["preemption.deadline_second=60"], run="grace", storage="s3://b/x")
    with pytest.raises(ConfigError, match="preemption"):
        plan_stage("tiny/pretrain", ["preemption.deadline_seconds=-1"], run="grace", storage="s3://b/x")


def test_explicit_grace_period_wins():
    job = job_config_from_dict({"grace_period_s": 300})
    assert job.grace_period({"preemption": {"deadline_seconds": 60}}) == 300


def test_packaged_configs_plan():
    for model in ("tiny", "bagel-7b-mot"):
        for stage in ("alignment", "pretrain", "continued", "sft"):
            plan = plan_stage(f"{model}/{stage}", run="packaged", storage="s3://bucket/x")
            assert plan.stage_run.stage == stage
            validate_object(plan.job_object())


def test_empty_init_from_left_out():
    run = StageRun("tiny/pretrain", "run-a", "pretrain", "s3://bucket/bagel")
    args = build_trainjob(job_config_from_dict({}), run, 60)["spec"]["trainer"]["args"]
    assert not any(arg.startswith("run.init_from") for arg in args)


def test_split_overrides():
    launcher, trainer = split_overrides(["job.nodes=2", "run.name=x", "train.steps=5"])
    assert launcher == ["job.nodes=2"]
    assert trainer == ["train.steps=5"]


@pytest.mark.parametrize(
    "override, expected",
    [
        ({"image": None}, "job.image=ghcr.io/bagel-platform/bagel-train:0.1.0"),
        ({"namespace": None}, "job.namespace=default"),
        ({"scheduling": {"priority_class": None}}, "job.scheduling.priority_class=''"),
        ({"storage_env": {"AWS_ENDPOINT_URL": None}}, "job.storage_env.AWS_ENDPOINT_URL=VALUE"),
    ],
)
def test_string_without_value_message(override, expected):
    # `job.image=` on the command line parses to None.
    with pytest.raises(ConfigError) as raised:
        job_config_from_dict(override)
    message = str(raised.value)
    assert "has no value" in message
    assert expected in message


def test_dump_yaml_writes_no_aliases():
    import io

    from bagel.platform.jobs.yaml_out import dump_yaml

    job = job_config_from_dict(JOB_SECTIONS["multi-node-kueue"])
    trainjob = build_trainjob(job, STAGE_RUN, 60)
    assert "&id" in yaml.safe_dump(trainjob, sort_keys=False)  # the builder shares the labels dict

    stream = io.StringIO()
    assert dump_yaml(trainjob, stream) is None
    text = stream.getvalue()
    assert "&id" not in text
    assert "*id" not in text
    assert yaml.safe_load(text) == trainjob
    assert list(yaml.safe_load(text)) == list(trainjob)
    assert dump_yaml(trainjob) == text


def test_data_root_reaches_the_pods(tmp_path, write_stage_config, monkeypatch):
    """BAGEL_DATA_ROOT set where the launcher resolves the config is set in the pods too; job.env wins."""
    config = write_stage_config(tmp_path / "stage.yaml", run={"name": "r", "stage": "pretrain", "storage": "s3://b/x"})
    monkeypatch.setenv("BAGEL_DATA_ROOT", "s3://my-data/demo")
    env = {item["name"]: item.get("value") for item in pod_env(plan_stage(config).job)}
    assert env["BAGEL_DATA_ROOT"] == "s3://my-data/demo"
    explicit = plan_stage(config, ["job.env.BAGEL_DATA_ROOT=s3://other/data"]).job
    assert {item["name"]: item.get("value") for item in pod_env(explicit)}["BAGEL_DATA_ROOT"] == "s3://other/data"

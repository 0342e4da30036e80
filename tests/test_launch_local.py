"""The local launch backend: torchrun on this machine with the cluster's outcome rules.

The ranks run a tiny stand-in training command (written below) instead of
`bagel train`, so these tests check the launcher's wiring alone. They cover
exit-code propagation through torchrun, reruns after preemption that resume
from the stand-in's "checkpoint" file, and no rerun after a user error. The stand-in
honours the same contract as the trainer: it resumes from
`{storage}/runs/{run}/{stage}/`, stops with exit code 75 after SIGTERM, uses
the BAGEL_FAULT_SIGTERM_AT_STEP hook (rank 0 signals its process group), and
exits 2 on an invalid config.
"""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bagel.platform.exit_codes import ExitCode
from bagel.platform.jobs.build import plan_stage
from bagel.platform.launch.local import LocalLauncher, classify_exit
from bagel.platform.launch.node import combine_exit_codes
from bagel.platform.launch.outcome import Outcome, strip_torchrun_report

pytestmark = pytest.mark.timeout(180)

STANDIN_TRAIN = r'''
import os, signal, sys, time
from pathlib import Path

args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
config = sys.argv[sys.argv.index("--config") + 1]
if "invalid" in config:
    print("ConfigError: invalid config", flush=True)
    sys.exit(2)
rank = int(os.environ["RANK"])
storage = args["run.storage"].removeprefix("file://")
stage_dir = Path(storage) / "runs" / args["run.name"] / args["run.stage"]
stage_dir.mkdir(parents=True, exist_ok=True)
checkpoint = stage_dir / f"step-rank{rank}"
start = int(checkpoint.read_text()) if checkpoint.exists() else 0
steps = int(args.get("train.steps", "4"))
stopping = []
signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
print(f"rank {rank} resumes at step {start}", flush=True)
fault = os.environ.get("BAGEL_FAULT_SIGTERM_AT_STEP")
for step in range(start + 1, steps + 1):
    time.sleep(0.05)
    if stopping:
        print(f"rank {rank} saved step {step - 1} and stops", flush=True)
        sys.exit(75)
    checkpoint.write_text(str(step))
    print(f"rank {rank} step {step}", flush=True)
    if fault and int(fault) == step and rank == 0:
        os.killpg(0, signal.SIGTERM)
        time.sleep(1)
if stopping:
    sys.exit(75)
if rank == 0:
    (stage_dir / "summary.json").write_text('{"steps": %d}' % steps)
'''


@pytest.fixture
def stage(tmp_path, write_stage_config):
    script = tmp_path / "standin_train.py"
    script.write_text(STANDIN_TRAIN)
    config = tmp_path / "stage.yaml"
    write_stage_config(
        config,
        run={"name": "local-run", "stage": "pretrain", "storage": f"file://{tmp_path}/store"},
        job={"retry": {"max_submissions": 3, "backoff_s": 0.0}, "grace_period_s": 20},
    )
    return tmp_path, script, config


@pytest.mark.slow
def test_preempted_run_resumes(stage):
    tmp_path, script, config = stage
    plan = plan_stage(str(config), ["train.steps=4"])
    out = io.StringIO()
    result = LocalLauncher(plan, nproc=2, script=str(script), preempt_at_step=2, out=out).launch()
    text = out.getvalue()
    assert result.outcome is Outcome.SUCCEEDED, text
    assert result.submissions == 2
    assert "rank 0 resumes at step 0" in text
    assert "rank 0 resumes at step 2" in text
    assert "rank 0 step 4" in text
    assert json.loads((tmp_path / "store/runs/local-run/pretrain/summary.json").read_text()) == {"steps": 4}


@pytest.mark.slow
def test_user_error_not_rerun(stage):
    tmp_path, script, _ = stage
    invalid = tmp_path / "invalid.yaml"
    invalid.write_text((tmp_path / "stage.yaml").read_text())
    plan = plan_stage(str(invalid))
    out = io.StringIO()
    result = LocalLauncher(plan, nproc=2, script=str(script), out=out).launch()
    assert result.outcome is Outcome.FAILED
    assert result.reason == "UserError"
    assert result.exit_code == ExitCode.USAGE_ERROR
    assert result.submissions == 1
    assert any("ConfigError" in line for line in result.log_tail)


@pytest.mark.slow
def test_cli_local_launch(stage):
    tmp_path, script, config = stage
    result_file = tmp_path / "result.json"
    completed = subprocess.run(
        [
            sys.executable, "-m", "bagel.platform", "launch", "--backend", "local", "--config", str(config),
            "--run", "cli-run", "--script", str(script), "--preempt", "pretrain:1", "--result-file", str(result_file),
            "train.steps=2",
        ],
        capture_output=True, text=True, timeout=150,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    summary = json.loads(result_file.read_text())
    assert summary["outcome"] == "succeeded"
    assert summary["submissions"] == 2
    assert summary["run"] == "cli-run"
    assert (tmp_path / "store/runs/cli-run/pretrain/summary.json").exists()


@pytest.mark.slow
def test_real_trainer_resumes(tmp_path):
    """`bagel launch --backend local` with the real `bagel train` on the tiny config: preempted at step 1, resumed, done."""
    demo = subprocess.run([sys.executable, "-m", "bagel.platform", "data", "demo", str(tmp_path / "data")], capture_output=True, text=True, timeout=120)
    assert demo.returncode == 0, demo.stderr
    env = {**os.environ, "BAGEL_DATA_ROOT": f"file://{tmp_path}/data"}
    storage = f"file://{tmp_path}/store"
    result_file = tmp_path / "result.json"
    completed = subprocess.run(
        [
            sys.executable, "-m", "bagel.platform", "launch", "--backend", "local", "--config", "tiny/pretrain",
            "--run", "real-run", "--storage", storage, "--preempt", "pretrain:1", "--result-file", str(result_file),
            "train.steps=2", "checkpoint.interval_steps=1", "metrics.gpu_health=false", "job.retry.backoff_s=0",
        ],
        capture_output=True, text=True, timeout=240, env=env,
    )
    logs = completed.stdout + completed.stderr
    assert completed.returncode == 0, logs[-4000:]
    summary = json.loads(result_file.read_text())
    assert summary["outcome"] == "succeeded"
    assert summary["submissions"] == 2
    assert "resumed from checkpoint" in logs
    assert (tmp_path / "store/runs/real-run/pretrain/summary.json").exists()


def test_cli_dry_run_prints_valid_job(stage):
    _, _, config = stage
    completed = subprocess.run(
        [
            sys.executable, "-m", "bagel.platform", "launch", "--config", str(config), "--storage", "s3://bucket/prefix",
            "--dry-run", "job.nodes=2", "job.kind=PyTorchJob",
        ],
        capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    job = yaml.safe_load(completed.stdout)
    assert job["kind"] == "PyTorchJob"
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["job.nodes=4", "job.gpus_per_node=6", "parallel.dp_shard=8"], "world size 24"),
        (["parallel.tp=3", "job.procs_per_node=2"], "does not divide"),
        (["paralel.tp=2"], "unknown key paralel"),
    ],
)
def test_cli_checks_stage_config_before_submitting(stage, overrides, expected):
    """Mistakes the trainer would find in every pod fail at submission, before the cluster allocates nodes."""
    _, _, config = stage
    completed = subprocess.run(
        [sys.executable, "-m", "bagel.platform", "launch", "--config", str(config), "--storage", "s3://bucket/prefix",
         "--dry-run", *overrides],
        capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == ExitCode.USAGE_ERROR
    assert expected in completed.stderr


def test_cli_refuses_local_storage_on_kubernetes(stage):
    _, _, config = stage
    completed = subprocess.run(
        [sys.executable, "-m", "bagel.platform", "launch", "--config", str(config), "--dry-run"],
        capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == ExitCode.USAGE_ERROR
    assert "local path" in completed.stderr
    assert "--storage s3://" in completed.stderr


def test_cli_invalid_job_section(stage):
    _, _, config = stage
    completed = subprocess.run(
        [sys.executable, "-m", "bagel.platform", "launch", "--config", str(config), "--dry-run", "job.gpus=8"],
        capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == ExitCode.USAGE_ERROR
    assert "unknown key job.gpus" in completed.stderr


@pytest.mark.parametrize(
    "torchrun_code, rank_codes, expected",
    [
        (1, [75, 0], 75),
        (1, [2, 75], 2),
        (1, [3, 3], 3),
        (1, [3, 75], 3),
        (1, [2, 3], 2),
        (0, [0, 0], 0),
        (1, [1, 0], 1),
        (0, [], 0),
    ],
)
def test_combine_exit_codes(torchrun_code, rank_codes, expected):
    assert combine_exit_codes(torchrun_code, rank_codes) == expected


@pytest.mark.parametrize(
    "code, outcome, reason",
    [
        (0, Outcome.SUCCEEDED, "Succeeded"),
        (75, Outcome.PREEMPTED, "CheckpointedOnSignal"),
        (2, Outcome.FAILED, "UserError"),
        (3, Outcome.FAILED, "Diverged"),
        (137, Outcome.FAILED, "Killed"),
        (1, Outcome.FAILED, "Failed"),
    ],
)
def test_classify_exit(code, outcome, reason):
    result = classify_exit(code, ["last line"])
    assert result.outcome is outcome
    assert result.reason == reason


def test_torchrun_report_stripped():
    lines = [
        "ERROR bagel.train: run.init_from=None is invalid: expected a string",
        "E1204 21:21:44.116000 23040 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 2)",
        "Traceback (most recent call last):",
        '  File "torch/distributed/run.py", line 1032, in <module>',
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ",
        "============================================================",
        "  exitcode  : 2 (pid: 23065) ",
    ]
    assert strip_torchrun_report(lines) == lines[:1]
    assert strip_torchrun_report(["plain failure"]) == ["plain failure"]


def test_classify_collective_timeout():
    result = classify_exit(1, ["[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(OpType=ALLREDUCE)"])
    assert result.reason == "NCCLTimeout"

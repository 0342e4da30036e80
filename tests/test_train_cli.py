"""`bagel train` end to end on the demo data: torchrun with 2 gloo ranks, TensorBoard events, summary, SIGTERM."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bagel.platform.config import config_path
from bagel.platform.data.synthetic import write_image_dataset
from bagel.platform.metrics.tensorboard import read_scalars

SCALARS = [
    "loss/total", "loss/ce", "loss/mse", "lr", "grad_norm", "throughput/tokens_per_s",
    "time/step_s", "time/data_wait_s", "memory/peak_gib", "train/skipped_steps",
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    subprocess.run([sys.executable, "-m", "bagel.platform", "data", "demo", str(root)], check=True, timeout=120)
    return root


def train(args: list[str], demo: Path, storage: Path, nproc: int, extra_env: dict | None = None):
    env = dict(os.environ, OMP_NUM_THREADS="1", BAGEL_DEVICE="cpu", BAGEL_DATA_ROOT=demo.as_uri())
    env.update(extra_env or {})
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] if nproc > 1 else []
    command = [sys.executable, *launcher, "-m", "bagel.platform", "train", *args, f"run.storage={storage.as_uri()}"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_tiny_pretrain_two_ranks(demo: Path, tmp_path: Path) -> None:
    result = train(["--config", "tiny/pretrain", "train.steps=4", "checkpoint.interval_steps=2"], demo, tmp_path, 2)
    assert result.returncode == 0, result.stderr[-4000:]
    stage = tmp_path / "runs" / "dev" / "pretrain"
    summary = json.loads((stage / "summary.json").read_text())
    assert summary["stage"] == "pretrain"
    assert summary["steps"] == 4
    assert summary["tokens"] > 0
    assert summary["final_ce"] is not None
    assert summary["final_mse"] is not None
    assert summary["checkpoint"].endswith("step-00000004")
    scalars = read_scalars(str(stage / "tensorboard"))
    for tag in SCALARS:
        assert [step for step, _ in scalars[tag]] == [1, 2, 3, 4], tag
    # The data counters are summed over both ranks' loaders: 4 steps x 2 ranks x 1 pack.
    assert scalars["data/packs"][-1] == (4, 8.0)
    assert scalars["data/tokens"][-1] == (4, float(summary["tokens"]))
    assert scalars["data/skipped"][-1][1] >= 0


@pytest.mark.slow
def test_sigterm_saves_and_exits_75(demo: Path, tmp_path: Path) -> None:
    result = train(
        ["--config", "tiny/pretrain", "train.steps=6", "checkpoint.interval_steps=100"],
        demo, tmp_path, 1, {"BAGEL_FAULT_SIGTERM_AT_STEP": "2"},
    )
    assert result.returncode == 75, result.stderr[-4000:]
    stage = tmp_path / "runs" / "dev" / "pretrain"
    assert (stage / "checkpoints" / "step-00000002").is_dir()
    assert not (stage / "summary.json").exists()
    assert "loss/total" in read_scalars(str(stage / "tensorboard"))


def test_invalid_config_exits_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bagel.platform", "train", "--config", "tiny/pretrain", "optim.lr=-1"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "optim.lr=-1" in result.stderr


def test_divergence_exits_3(demo: Path, tmp_path: Path) -> None:
    """A learning rate of 1e8 makes the second loss NaN; under the stop policy the run exits 3 (never retried)."""
    result = train(
        ["--config", "tiny/pretrain", "train.steps=6", "optim.lr=1e8", "schedule.warmup_steps=0",
         "train.spike.policy=stop", "checkpoint.enable=false"],
        demo, tmp_path, 1,
    )
    assert result.returncode == 3, result.stderr[-4000:]
    assert "training diverged" in result.stderr
    assert "step 2: " in result.stderr
    assert "=nan is not finite" in result.stderr
    assert "total=nan" not in result.stderr  # the message names the term (ce or mse), not the sum
    assert "or set train.spike.policy=skip" in result.stderr
    assert not (tmp_path / "runs" / "dev" / "pretrain" / "summary.json").exists()


def test_missing_storage_bucket_exits_2(demo: Path, s3_server) -> None:
    """run.storage on a bucket that does not exist fails before any training and does not create the bucket."""
    env = dict(os.environ, OMP_NUM_THREADS="1", BAGEL_DEVICE="cpu", BAGEL_DATA_ROOT=demo.as_uri(), **s3_server.env)
    result = subprocess.run(
        [sys.executable, "-m", "bagel.platform", "train", "--config", "tiny/pretrain", "run.storage=s3://no-such-run-bucket/bagel"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr[-4000:]
    assert "no-such-run-bucket" in result.stderr
    assert "does not exist" in result.stderr
    buckets = [bucket["Name"] for bucket in s3_server.client().list_buckets()["Buckets"]]
    assert "no-such-run-bucket" not in buckets


def bad_data_config(tmp_path: Path) -> Path:
    """Return a tiny pretrain config whose only dataset has 4 bad samples in 24 (17%)."""
    faults = {1: "corrupt_image", 4: "zero_size_image", 7: "missing_field", 10: "too_long"}
    uri = write_image_dataset((tmp_path / "bad").as_uri(), "bad", 24, 3, bad=faults)
    config = yaml.safe_load(config_path("tiny/pretrain").read_text())
    config["data"]["datasets"] = [{"name": "bad", "uri": uri}]
    config["data"]["skip_min_samples"] = 5
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_skipped_samples_reach_tensorboard(demo: Path, tmp_path: Path) -> None:
    config = bad_data_config(tmp_path)
    result = train(["--config", str(config), "train.steps=3", "data.skip_threshold=0.5", "checkpoint.enable=false"], demo, tmp_path, 1)
    assert result.returncode == 0, result.stderr[-4000:]
    scalars = read_scalars(str(tmp_path / "runs" / "dev" / "pretrain" / "tensorboard"))
    assert scalars["data/skipped"][-1][1] > 0
    assert scalars["data/skipped/corrupt_image"][-1][1] >= 1


def test_skip_threshold_exits_2(demo: Path, tmp_path: Path) -> None:
    config = bad_data_config(tmp_path)
    result = train(["--config", str(config), "train.steps=20", "data.skip_threshold=0.01"], demo, tmp_path, 1)
    assert result.returncode == 2, result.stderr[-4000:]
    assert "dataset bad" in result.stderr
    assert "skip_threshold" in result.stderr

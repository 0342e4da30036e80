"""`bagel train` (tiny model, demo data, 2 gloo ranks) survives SIGTERM and SIGKILL with bit-identical results.

Three successive resumes in one run on the loopback SeaweedFS server: SIGTERM
to rank 1 only, SIGKILL of both ranks, SIGTERM to both, then a run to the
end. The final model, EMA and optimizer tensors and the final loss equal an
uninterrupted run's bit for bit. The stage summary and the last attempt's
TensorBoard events report the time lost over all four attempts. The ranks are started directly with the
torchrun environment (no agent), so each rank's exit code is visible; the
fault hooks are the BAGEL_FAULT_* variables of `bagel.platform.preemption`.
The toy-loop tests cover the same on `file://`.
"""

import json
import random
import subprocess
import sys
import uuid

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from bagel.platform.checkpoint import storage
from bagel.platform.checkpoint.toy import spawn_ranks, wait_ranks
from bagel.platform.exit_codes import ExitCode
from bagel.platform.metrics.tensorboard import read_scalars

pytestmark = pytest.mark.slow

STEPS = 6
SEED = 5


def train_command(root: str, run: str, tensorboard: bool = False) -> list[str]:
    return [
        sys.executable, "-m", "bagel.platform", "train", "--config", "tiny/pretrain",
        f"train.steps={STEPS}", "checkpoint.interval_steps=2", f"run.name={run}", f"run.storage={root}",
        f"metrics.tensorboard={str(tensorboard).lower()}", "metrics.gpu_health=false", "metrics.sync_every_s=600",
        # The goodput ledger is written after every step, so the SIGKILLed attempt's lost work is counted.
        "metrics.goodput_heartbeat_s=0",
    ]


def read_tensors(uri: str, options: dict) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP checkpoint (model, EMA, optimizer), unsharded."""
    metadata = FsspecReader(uri, **options).read_metadata()
    tensors = {
        key: torch.empty(item.size, dtype=item.properties.dtype)
        for key, item in metadata.state_dict_metadata.items()
        if isinstance(item, TensorStorageMetadata)
    }
    dcp.load(tensors, storage_reader=FsspecReader(uri, **options), no_dist=True)
    return tensors


def read_json(uri: str, options: dict) -> dict:
    fs, path = storage.open_fs(uri, options)
    return storage.read_json(fs, path)


def logs(directory) -> str:
    return "\n".join(path.read_text() for path in sorted(directory.glob("*.log")))


def test_train_preemptions_bit_identical(tmp_path, s3_server):
    demo = tmp_path / "demo"
    subprocess.run([sys.executable, "-m", "bagel.platform", "data", "demo", str(demo)], check=True, timeout=120)
    root = f"{s3_server.make_bucket('train-preemption')}/{uuid.uuid4().hex[:8]}"
    options = s3_server.storage_options
    env = {**s3_server.env, "BAGEL_DEVICE": "cpu", "BAGEL_DATA_ROOT": demo.as_uri()}

    rng = random.Random(SEED)
    sigterm_one_rank = rng.randint(1, 2)
    sigkill = rng.randint(sigterm_one_rank + 1, 4)
    sigterm_both = rng.randint(sigkill + 1, STEPS - 1)
    attempts = [
        ("sigterm-rank1", {"BAGEL_FAULT_SIGTERM_AT_STEP": str(sigterm_one_rank), "BAGEL_FAULT_RANKS": "1"}, [ExitCode.PREEMPTED] * 2),
        ("sigkill", {"BAGEL_FAULT_SIGKILL_AT_STEP": str(sigkill)}, [-9, -9]),
        ("sigterm", {"BAGEL_FAULT_SIGTERM_AT_STEP": str(sigterm_both)}, [ExitCode.PREEMPTED] * 2),
        ("final", {}, [0, 0]),
    ]
    context = f"faults after steps {sigterm_one_rank}, {sigkill}, {sigterm_both}"

    # The uninterrupted reference runs beside the first attempt (another run
    # name), which keeps the test's wall time down on 2 cores.
    (tmp_path / "reference").mkdir()
    reference = spawn_ranks(train_command(root, "reference"), 2, env=env, log_dir=str(tmp_path / "reference"))
    for name, fault_env, expected_codes in attempts:
        (tmp_path / name).mkdir()
        # The last attempt also writes TensorBoard events, to check the goodput scalars after the resumes.
        command = train_command(root, "chain", tensorboard=name == "final")
        codes = wait_ranks(spawn_ranks(command, 2, env={**env, **fault_env}, log_dir=str(tmp_path / name)), 300)
        assert codes == expected_codes, f"{name}: {context}\n{logs(tmp_path / name)[-6000:]}"
    assert wait_ranks(reference, 300) == [0, 0], logs(tmp_path / "reference")[-6000:]

    assert f"step-{sigterm_one_rank:08d} at step {sigterm_one_rank} " in logs(tmp_path / "sigkill")
    assert "resumed from checkpoint" in logs(tmp_path / "final")

    stage = f"{root}/runs/chain/pretrain"
    expected_summary = read_json(f"{root}/runs/reference/pretrain/summary.json", options)
    summary = read_json(f"{stage}/summary.json", options)
    assert summary["steps"] == STEPS
    assert summary["tokens"] == expected_summary["tokens"]
    assert summary["last_loss"] == expected_summary["last_loss"], context
    # The first loss is the stage's, carried through the checkpoints, not the
    # first step of the last attempt.
    assert summary["first_loss"] == expected_summary["first_loss"], context
    assert summary["final_ce"] == expected_summary["final_ce"]
    assert summary["final_mse"] == expected_summary["final_mse"]
    assert 0 < summary["goodput"] <= 1
    # Time lost over the four attempts: every attempt restarted and saved, and the
    # SIGKILLed attempt's steps after its last committed checkpoint were redone.
    breakdown = summary["goodput_breakdown"]
    assert breakdown["goodput"] == summary["goodput"]
    assert breakdown["attempts"] == len(attempts)
    assert breakdown["restart_s"] > 0, breakdown
    assert breakdown["checkpoint_stall_s"] > 0, breakdown
    assert breakdown["lost_work_s"] > 0, breakdown
    assert breakdown["productive_s"] < breakdown["wall_time_s"]
    fs, path = storage.open_fs(f"{stage}/tensorboard", options)
    (tmp_path / "events").mkdir()
    for remote in fs.ls(path, detail=False):
        fs.get(remote, str(tmp_path / "events" / remote.rsplit("/", 1)[-1]))
    scalars = read_scalars(str(tmp_path / "events"))
    for tag in ("goodput", "restart_s", "checkpoint_stall_s", "lost_work_s", "attempts"):
        assert f"goodput/{tag}" in scalars, sorted(scalars)
    assert scalars["goodput/attempts"][-1] == (STEPS, len(attempts))
    assert scalars["goodput/lost_work_s"][-1][1] > 0

    final = f"{stage}/checkpoints/step-{STEPS:08d}"
    expected = read_tensors(f"{root}/runs/reference/pretrain/checkpoints/step-{STEPS:08d}", options)
    actual = read_tensors(final, options)
    assert set(actual) == set(expected)
    assert any(key.startswith("optimizer.") for key in actual) and any(key.startswith("ema.") for key in actual)
    mismatched = [key for key in expected if not torch.equal(actual[key], expected[key])]
    assert mismatched == [], f"{len(mismatched)} tensors differ, e.g. {mismatched[:3]} ({context})"

    # One goodput ledger per attempt.
    fs, path = storage.open_fs(f"{stage}/goodput", options)
    assert len(storage.list_sizes(fs, path)) == len(attempts)

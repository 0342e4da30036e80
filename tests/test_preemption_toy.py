"""Preemption and resharding with the checkpoint manager on 2 gloo ranks (the toy FSDP2 loop in
`bagel.platform.checkpoint.toy`, which calls the manager exactly as the trainer does).

- SIGTERM (to one rank only, then to both) and SIGKILL at steps drawn from a
  seed, three successive resumes, then a run to the end: every step's loss and
  the final model, EMA and optimizer state equal an uninterrupted run bit for bit.
- A checkpoint saved by 2 ranks resumes on 1 and on 4 ranks with the same
  full (unsharded) state, and training continues.
Resharding runs on `file://` and on the loopback SeaweedFS server; the fault
chain runs on `file://` here and on SeaweedFS with `bagel train`.
"""

import json
import random
import sys
import uuid

import pytest

from bagel.platform.checkpoint.toy import spawn_ranks, wait_ranks
from bagel.platform.exit_codes import ExitCode

pytestmark = pytest.mark.slow

STEPS = 10
RANK_TIMEOUT_S = 120


def run_toy(tmp_path, name: str, storage: str, nprocs: int = 2, env: dict | None = None, **flags) -> tuple[list[int], dict | None]:
    """Run the toy loop on `nprocs` ranks; return their exit codes and rank 0's result (None if it was killed)."""
    out = tmp_path / f"{name}.json"
    command = [sys.executable, "-m", "bagel.platform.checkpoint.toy", "--storage", storage, "--out", str(out)]
    for flag, value in flags.items():
        command += [f"--{flag.replace('_', '-')}", str(value)]
    log_dir = tmp_path / f"{name}-logs"
    log_dir.mkdir()
    codes = wait_ranks(spawn_ranks(command, nprocs, env=env, log_dir=str(log_dir)), RANK_TIMEOUT_S)
    result = json.loads(out.read_text()) if out.exists() else None
    return codes, result


def rank_logs(tmp_path, name: str) -> str:
    return "\n".join(path.read_text() for path in sorted((tmp_path / f"{name}-logs").glob("*.log")))


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    """Return (storage root URI, environment for the ranks)."""
    if request.param == "file":
        return f"file://{tmp_path}/store", {}
    server = request.getfixturevalue("s3_server")
    bucket = server.make_bucket("preemption-tests")
    return f"{bucket}/{uuid.uuid4().hex[:8]}", server.env


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: the same run without faults (numerics do not depend on the store)."""
    tmp_path = tmp_path_factory.mktemp("reference")
    codes, result = run_toy(tmp_path, "reference", f"file://{tmp_path}/store", run="reference", steps=STEPS, interval_steps=3)
    assert codes == [0, 0], rank_logs(tmp_path, "reference")
    return result


# `file://` only: the same fault chain on S3 runs with the real trainer in
# test_preemption_train.py (another seed), and two chains here would exceed
# the suite's time budget.
@pytest.mark.parametrize(("store", "seed"), [("file", 11)], indirect=["store"])
def test_faults_resume_bit_identical(tmp_path, store, uninterrupted, seed):
    root, env = store
    rng = random.Random(seed)
    sigterm_one_rank = rng.randint(1, 3)
    sigkill = rng.randint(sigterm_one_rank + 1, sigterm_one_rank + 3)
    sigterm_both = rng.randint(sigkill + 1, STEPS - 1)
    attempts = [
        ("sigterm-rank1", {"BAGEL_FAULT_SIGTERM_AT_STEP": str(sigterm_one_rank), "BAGEL_FAULT_RANKS": "1"}),
        ("sigkill", {"BAGEL_FAULT_SIGKILL_AT_STEP": str(sigkill)}),
        ("sigterm", {"BAGEL_FAULT_SIGTERM_AT_STEP": str(sigterm_both)}),
        ("final", {}),
    ]
    results = {}
    codes = {}
    for name, fault_env in attempts:
        codes[name], results[name] = run_toy(
            tmp_path, name, root, env={**env, **fault_env}, run="chain", steps=STEPS, interval_steps=3
        )

    context = f"faults at steps {sigterm_one_rank}, {sigkill}, {sigterm_both}"
    assert codes["sigterm-rank1"] == [ExitCode.PREEMPTED] * 2, context + rank_logs(tmp_path, "sigterm-rank1")
    assert codes["sigkill"] == [-9, -9], context
    assert codes["sigterm"] == [ExitCode.PREEMPTED] * 2, context + rank_logs(tmp_path, "sigterm")
    assert codes["final"] == [0, 0], context + rank_logs(tmp_path, "final")

    # A SIGTERM saves the step it stopped after; a SIGKILL falls back to the
    # newest checkpoint that had committed.
    assert results["sigterm-rank1"]["final_step"] == sigterm_one_rank
    assert results["sigkill"] is None  # killed before writing its result
    assert f"step-{sigterm_one_rank:08d} at step {sigterm_one_rank} " in rank_logs(tmp_path, "sigkill")
    assert sigterm_one_rank <= results["sigterm"]["resumed_step"] <= sigkill, context
    assert results["final"]["resumed_step"] == sigterm_both
    assert results["final"]["source"] == "checkpoint"

    # Every step any attempt computed has the uninterrupted run's loss, bit for bit.
    for name in ("sigterm-rank1", "sigterm", "final"):
        for step, loss in results[name]["losses"].items():
            assert loss == uninterrupted["losses"][step], f"{name} step {step} ({context})"
    assert results["final"]["final_step"] == STEPS
    assert results["final"]["tokens_seen"] == uninterrupted["tokens_seen"]
    assert results["final"]["digests"] == uninterrupted["digests"], context

    goodput = results["final"]["goodput"]
    assert goodput["attempts"] == 4
    assert 0 < goodput["goodput"] <= 1
    assert goodput["restart_s"] > 0


def test_resume_on_one_and_four_ranks(tmp_path, store):
    root, env = store
    codes, saved = run_toy(tmp_path, "two", root, nprocs=2, env=env, run="reshard", steps=4, interval_steps=2)
    assert codes == [0, 0], rank_logs(tmp_path, "two")

    # --steps equal to the saved step: load, train nothing, report the full state.
    codes, one = run_toy(tmp_path, "one", root, nprocs=1, env=env, run="reshard", steps=4, interval_steps=2)
    assert codes == [0], rank_logs(tmp_path, "one")
    assert (one["source"], one["resumed_step"], one["saved_world_size"]) == ("checkpoint", 4, 2)
    assert one["digests"] == saved["digests"]
    assert one["loader_consumed"] == saved["loader_consumed"]

    codes, four = run_toy(tmp_path, "four", root, nprocs=4, env=env, run="reshard", steps=6, interval_steps=2)
    assert codes == [0, 0, 0, 0], rank_logs(tmp_path, "four")
    assert (four["source"], four["resumed_step"], four["saved_world_size"]) == ("checkpoint", 4, 2)
    assert four["final_step"] == 6
    assert four["loader_consumed"] == saved["loader_consumed"] + 2 * 4  # two more steps on four ranks
    assert "resharding dataloader: saved by 2 ranks, resuming on 4" in rank_logs(tmp_path, "four")

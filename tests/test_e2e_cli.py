"""`bagel run --local` argument checks: invalid arguments exit 2 with a message before anything runs."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--preempt", "pretrain"], "--preempt 'pretrain' is invalid"),
        (["--preempt", "pretrain:0"], "--preempt 'pretrain:0' is invalid"),
        (["--stages", "alignment", "--preempt", "sft:3"], "--preempt 'sft:3' is invalid"),
        (["--stages", "pretrain,finetune"], "--stages 'pretrain,finetune' is invalid"),
        (["--run", "My_Run"], "invalid run name 'My_Run'"),
        (["--nproc", "0"], "--nproc 0 is invalid"),
    ],
)
def test_run_local_rejects_arguments(tmp_path, arguments, message):
    workdir = tmp_path / "work"
    completed = subprocess.run(
        [sys.executable, "-m", "bagel.platform", "run", "--local", "--workdir", str(workdir), *arguments],
        capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 2, completed.stderr
    assert message in completed.stderr
    # Nothing was created: the checks run before the work directory is made.
    assert not workdir.exists()

"""Parallel layouts train the tiny model exactly like one process (CPU, gloo, fp32, fixed packs).

Each layout runs `bagel.platform.train.testing` under torchrun for 3 steps on
the same global batch of 2 fixed synthetic packs per step. Data-parallel ranks
split that batch and gradient accumulation makes up the rest. The per-step
losses and global grad norms must equal the single-process run within 1e-5
relative.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

LAYOUTS = {
    "dp_shard=2": 2,
    "tp=2,dp_shard=1": 2,
    "cp=2,dp_shard=1": 2,
    "dp_replicate=2,dp_shard=1": 2,
    "dp_shard=2,tp=2": 4,
}


def run_layout(layout: str, nproc: int, out: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", BAGEL_DEVICE="cpu")
    harness = ["-m", "bagel.platform.train.testing", "--layout", layout, "--steps", "3", "--out", str(out)]
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] if nproc > 1 else []
    command = [sys.executable, *launcher, *harness]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, f"layout {layout} failed:\n{result.stderr[-4000:]}"
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    return run_layout("", 1, tmp_path_factory.mktemp("single") / "out.json")


def assert_close(name: str, expected: list, actual: list) -> None:
    assert len(expected) == len(actual) == 3
    for step, (a, b) in enumerate(zip(expected, actual), start=1):
        assert (a is None) == (b is None), f"{name} step {step}: {a} vs {b}"
        if a is not None:
            assert math.isclose(a, b, rel_tol=1e-5), f"{name} step {step}: single process {a}, layout {b}"


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout: str, reference: dict, tmp_path: Path) -> None:
    history = run_layout(layout, LAYOUTS[layout], tmp_path / "out.json")
    for name in ("loss", "ce", "mse", "grad_norm"):
        assert_close(name, reference[name], history[name])


def test_reference_is_finite_and_learns(reference: dict) -> None:
    assert all(math.isfinite(v) for v in reference["loss"] + reference["grad_norm"])
    assert reference["ce"][0] is not None and reference["mse"][0] is not None

"""Parallel layouts train the tiny model exactly like one process (CPU, gloo, fp32, fixed packs).

Each layout runs `bagel.platform.train.testing` under torchrun for 3 steps on
the same global batch of fixed synthetic packs per step (2 packs, or 4 for the
8-rank layout so that its 4 data-parallel ranks get one each). Data-parallel
ranks split that batch and gradient accumulation makes up the rest. The
per-step losses and global grad norms must equal the single-process run on
the same packs within 1e-5 relative.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

# layout -> (processes, global packs per step)
LAYOUTS = {
    "dp_shard=2": (2, 2),
    "tp=2,dp_shard=1": (2, 2),
    "cp=2,dp_shard=1": (2, 2),
    "dp_replicate=2,dp_shard=1": (2, 2),
    "dp_shard=2,tp=2": (4, 2),
    "dp_shard=2,cp=2": (4, 2),
    "tp=2,cp=2,dp_shard=1": (4, 2),
    # HSDP with TP: replicate x shard x tp on 8 ranks.
    "dp_replicate=2,dp_shard=2,tp=2": (8, 4),
}


def run_layout(layout: str, nproc: int, out: Path, global_packs: int = 2) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", BAGEL_DEVICE="cpu")
    harness = [
        "-m", "bagel.platform.train.testing", "--layout", layout, "--steps", "3",
        "--global-packs", str(global_packs), "--out", str(out),
    ]
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] if nproc > 1 else []
    command = [sys.executable, *launcher, *harness]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, f"layout {layout} failed:\n{result.stderr[-4000:]}"
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> Callable[[int], dict]:
    """Single-process runs, one per global batch size, computed on first use."""
    cache: dict[int, dict] = {}

    def get(global_packs: int) -> dict:
        if global_packs not in cache:
            out = tmp_path_factory.mktemp(f"single-{global_packs}") / "out.json"
            cache[global_packs] = run_layout("", 1, out, global_packs)
        return cache[global_packs]

    return get


@pytest.fixture(scope="module")
def reference(references) -> dict:
    return references(2)


def assert_close(name: str, expected: list, actual: list) -> None:
    assert len(expected) == len(actual) == 3
    for step, (a, b) in enumerate(zip(expected, actual), start=1):
        assert (a is None) == (b is None), f"{name} step {step}: {a} vs {b}"
        if a is not None:
            assert math.isclose(a, b, rel_tol=1e-5), f"{name} step {step}: single process {a}, layout {b}"


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout: str, references, tmp_path: Path) -> None:
    nproc, global_packs = LAYOUTS[layout]
    history = run_layout(layout, nproc, tmp_path / "out.json", global_packs)
    reference = references(global_packs)
    for name in ("loss", "ce", "mse", "grad_norm"):
        assert_close(name, reference[name], history[name])


def test_reference_is_finite_and_learns(reference: dict) -> None:
    assert all(math.isfinite(v) for v in reference["loss"] + reference["grad_norm"])
    assert reference["ce"][0] is not None and reference["mse"][0] is not None

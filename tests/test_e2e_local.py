"""End to end: `bagel run --local` trains the tiny BAGEL through all four stages on the real demo data.

Every component is real. The data is the demo dataset written by `bagel data
demo`. The pipeline runs on kfp's local runner, each stage under torchrun with
2 ranks (FSDP2 on gloo), with the real checkpointer and promotion between
stages. The s3:// run uses SeaweedFS on 127.0.0.1, and the dashboard check
uses TensorBoard and headless Chromium. Only the step count is shrunk, through
`key=value` overrides, to fit CI's time budget.

One file:// run (a module fixture) is shared by the summary, reuse and
TensorBoard tests. The s3:// run trains the first two stages, is preempted in
pretrain, and must end with the same weights as the uninterrupted file:// run.
"""

import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from bagel.platform.metrics.tensorboard import read_scalars

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

STEPS = 16
OVERRIDES = [f"train.steps={STEPS}", "checkpoint.interval_steps=8"]
STAGES = ("alignment", "pretrain", "continued", "sft")
PREEMPT_STEP = 5


def bagel_run(workdir: Path, *args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `bagel run --local --workdir WORKDIR ARGS... OVERRIDES` and return the completed process."""
    environment = {k: v for k, v in os.environ.items() if k not in ("BAGEL_STORAGE", "BAGEL_DATA_ROOT")}
    environment.update(env or {})
    command = [sys.executable, "-m", "bagel.platform", "run", "--local", "--workdir", str(workdir), *args, *OVERRIDES]
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=timeout)
    # Shown by pytest when a test fails.
    print(completed.stdout[-6000:], completed.stderr[-3000:])
    return completed


def read_summary(workdir: Path, run: str = "local") -> dict:
    return json.loads((workdir / f"{run}-summary.json").read_text())


def weights_digest(uri: str, storage_options: dict | None = None) -> str:
    """SHA-256 of a promoted checkpoint's weights alone (model and EMA), without its config digest."""
    from bagel.platform.checkpoint.promote import content_digest, read_weights

    return content_digest(read_weights(uri, storage_options), "")


@pytest.fixture(scope="module")
def file_run(tmp_path_factory):
    """One uninterrupted four-stage run on the default file:// storage of a fresh work directory."""
    workdir = tmp_path_factory.mktemp("e2e") / "bagel-work"
    completed = bagel_run(workdir)
    return workdir, completed


def test_run_trains_all_stages(file_run):
    workdir, completed = file_run
    assert completed.returncode == 0, completed.stdout[-3000:]
    out = completed.stdout
    storage = (workdir / "storage").as_uri()
    assert f"demo dataset: writing to {storage}/data" in out
    for stage in STAGES:
        assert f"== {stage}: training on 2 rank(s) ==" in out
        assert f"[{stage}] step {STEPS}/{STEPS}  loss" in out
    assert "tok/s  ETA" in out
    assert "stage      outcome  steps  tokens  loss first->last" in out

    summary = read_summary(workdir)
    assert summary["storage"] == storage
    assert summary["final_checkpoint"]["uri"] == summary["stages"][-1]["promoted_uri"]
    assert summary["final_checkpoint"]["digest"] == summary["stages"][-1]["promoted_digest"]
    assert [s["stage"] for s in summary["stages"]] == list(STAGES)
    for report in summary["stages"]:
        stage = report["stage"]
        stage_dir = workdir / "storage" / "runs" / "local" / stage
        assert report["outcome"] == "trained", report
        assert report["submissions"] == 1, report
        assert report["steps"] == STEPS
        assert report["tokens"] > STEPS * 100
        # Every step trains on different samples, so single-step losses are noisy. With fixed seeds
        # (data, init, noise), the mean loss of the last quarter of the steps is below the first quarter's.
        series = [value for _, value in read_scalars(str(stage_dir / "tensorboard"))["loss/total"]]
        assert len(series) == STEPS, stage
        assert (series[0], series[-1]) == pytest.approx((report["first_loss"], report["last_loss"]), rel=1e-6)
        quarter = STEPS // 4
        assert statistics.mean(series[-quarter:]) < statistics.mean(series[:quarter]), (stage, series)
        assert math.isfinite(report["final_ce"])
        if stage == "alignment":
            assert report["final_mse"] is None  # alignment has no image generation, so no MSE term
        else:
            assert math.isfinite(report["final_mse"])
        assert 0 < report["goodput"] <= 1
        assert report["wall_time_s"] > 0
        assert report["promoted_uri"] == f"{storage}/promoted/{report['promoted_digest']}"
        promoted = Path(report["promoted_uri"].removeprefix("file://"))
        assert (promoted / "MANIFEST").exists()
        # The table row and the trainer's own summary.json agree.
        trainer = json.loads((stage_dir / "summary.json").read_text())
        assert (trainer["steps"], trainer["tokens"], trainer["last_loss"]) == (report["steps"], report["tokens"], report["last_loss"])
        assert report["promoted_digest"][:12] in out
        assert report["promoted_uri"] in out
    # Each stage starts from the previous stage's promoted checkpoint.
    assert f"[alignment] starting at step 1/{STEPS} (fresh)" in out
    for stage in STAGES[1:]:
        assert f"[{stage}] starting at step 1/{STEPS} (init_from)" in out
    log = next((workdir / "logs").glob("local-*.log")).read_text()
    for previous, stage in zip(STAGES, STAGES[1:]):
        digest = next(r["promoted_digest"] for r in summary["stages"] if r["stage"] == previous)
        assert f"run.init_from={storage}/promoted/{digest}" in log or f'"init_from": "{storage}/promoted/{digest}"' in log, stage


def test_rerun_reuses_checkpoints(file_run):
    workdir, first = file_run
    assert first.returncode == 0
    trained = {r["stage"]: r for r in read_summary(workdir)["stages"]}
    completed = bagel_run(workdir)
    assert completed.returncode == 0, completed.stdout[-3000:]
    assert "demo dataset: " in completed.stdout
    assert "(already there)" in completed.stdout
    assert "training on" not in completed.stdout
    reused = {r["stage"]: r for r in read_summary(workdir)["stages"]}
    for stage in STAGES:
        assert f"== {stage}: reusing {trained[stage]['promoted_uri']}" in completed.stdout
        assert reused[stage]["outcome"] == "reused"
        assert reused[stage]["submissions"] == 0
        assert reused[stage]["promoted_digest"] == trained[stage]["promoted_digest"]


def test_preempted_s3_run_same_weights(file_run, s3_server):
    """The first two stages on SeaweedFS, pretrain stopped by SIGTERM at a step and resumed.

    Its promoted pretrain weights equal those of the uninterrupted file:// run:
    the same data and seeds, and an exact resume (model, optimizer, EMA, data
    position and RNG), give the same bytes regardless of the storage.
    """
    file_workdir, reference = file_run
    assert reference.returncode == 0
    root = s3_server.make_bucket("bagel-e2e")
    storage = f"{root}/platform"
    workdir = file_workdir.parent / "s3-work"
    completed = bagel_run(
        workdir, "--storage", storage, "--stages", "alignment,pretrain", "--preempt", f"pretrain:{PREEMPT_STEP}",
        env=s3_server.env,
    )
    assert completed.returncode == 0, completed.stdout[-3000:]
    out = completed.stdout
    assert f"demo dataset: writing to {storage}/data" in out
    assert "[pretrain] submission 1/5: preempted" in out
    assert f"[pretrain] starting at step {PREEMPT_STEP + 1}/{STEPS} (" in out

    import fsspec

    fs = fsspec.filesystem("s3", **s3_server.storage_options)
    assert fs.exists(f"bagel-e2e/platform/data/t2i/manifest.json")
    stages = {r["stage"]: r for r in read_summary(workdir)["stages"]}
    assert list(stages) == ["alignment", "pretrain"]
    assert stages["alignment"]["submissions"] == 1
    assert stages["pretrain"]["submissions"] == 2
    for report in stages.values():
        assert report["outcome"] == "trained"
        assert report["steps"] == STEPS
        assert report["promoted_uri"] == f"{storage}/promoted/{report['promoted_digest']}"

    uninterrupted = {r["stage"]: r for r in read_summary(file_workdir)["stages"]}
    for stage in ("alignment", "pretrain"):
        s3_weights = weights_digest(stages[stage]["promoted_uri"], s3_server.storage_options)
        assert s3_weights == weights_digest(uninterrupted[stage]["promoted_uri"]), stage


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


def test_tensorboard_every_stage_loss(file_run, tmp_path):
    """`bagel tensorboard local` on the finished run: HTTP API has each stage's loss series; Chromium screenshot."""
    workdir, completed = file_run
    assert completed.returncode == 0
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "bagel.platform", "tensorboard", "local", "--workdir", str(workdir), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("TensorBoard: http://127.0.0.1:"), line
        url = line.split()[1].rstrip("/")
        # TensorBoard loads event files in the background; wait until every stage is listed.
        deadline = time.monotonic() + 60
        runs: list[str] = []
        while time.monotonic() < deadline:
            runs = _get_json(f"{url}/data/runs")
            if all(any(r.startswith(stage) for r in runs) for stage in STAGES):
                break
            time.sleep(1)
        tags = _get_json(f"{url}/data/plugin/scalars/tags")
        for stage in STAGES:
            run = next(r for r in runs if r.startswith(stage))
            assert "loss/total" in tags[run], (run, sorted(tags[run]))
            series = _get_json(f"{url}/data/plugin/scalars/scalars?run={urllib.parse.quote(run)}&tag=loss/total")
            assert [point[1] for point in series] == list(range(1, STEPS + 1)), run

        chromium = _chromium()
        if chromium is None:
            pytest.skip("chromium is not installed (apt-get install -y chromium); the HTTP checks above passed")
        screenshot = tmp_path / "tensorboard-scalars.png"
        subprocess.run(
            [
                chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--enable-unsafe-swiftshader", "--use-angle=swiftshader", f"--user-data-dir={tmp_path / 'chromium'}",
                "--window-size=1400,900", "--virtual-time-budget=15000", f"--screenshot={screenshot}",
                # The tag filter puts the loss charts at the top of the page.
                f"{url}/#scalars&tagFilter=loss",
            ],
            check=True, capture_output=True, timeout=120,
        )
        # A rendered page, not an empty or error image: a PNG of some size.
        assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert screenshot.stat().st_size > 20_000
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)

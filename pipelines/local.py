"""`bagel run --local`: the four-stage pipeline on this machine, from an empty directory to promoted checkpoints.

It creates the work directory and writes the demo dataset into storage unless
its manifests exist. Then it runs the kfp pipeline with the local runner in a
child process (`bagel.pipelines.local_runner`). The child's full output goes to
`{workdir}/logs/{run}-{time}.log`, and `ProgressView` prints a condensed view
of it. At the end it prints the per-stage summary and saves it to
`{workdir}/{run}-summary.json`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bagel.platform.exit_codes import ExitCode

logger = logging.getLogger(__name__)

DEMO_TASKS = ("t2i", "vlm", "edit")


@dataclass
class LocalRun:
    """Settings of one `bagel run --local`."""

    workdir: Path
    run: str
    storage: str  # URI root of runs and promoted checkpoints
    data_root: str  # URI of the demo dataset; the tiny configs read it through $BAGEL_DATA_ROOT
    arguments: dict = field(default_factory=dict)  # the pipeline's parameter values
    stages: list[str] = field(default_factory=list)
    nproc: int = 2
    preempt: str = ""  # STAGE:STEP, or ""


def ensure_demo_data(data_root: str, out) -> None:
    """Write the demo dataset to `data_root` with `bagel data demo` unless all its manifests exist."""
    from bagel.platform.checkpoint import storage as store

    fs, path = store.open_fs(data_root)
    missing = [task for task in DEMO_TASKS if not fs.exists(f"{path.rstrip('/')}/{task}/manifest.json")]
    if not missing:
        out.write(f"demo dataset: {data_root} (already there)\n")
        return
    out.write(f"demo dataset: writing to {data_root} ...\n")
    out.flush()
    completed = subprocess.run(
        [sys.executable, "-m", "bagel.platform", "data", "demo", data_root], capture_output=True, text=True
    )
    if completed.returncode != 0:
        raise RuntimeError(f"bagel data demo {data_root} failed with exit code {completed.returncode}: {completed.stderr[-2000:]}")


def run_local_pipeline(settings: LocalRun, out=sys.stdout) -> int:
    """Run the pipeline as described in the module docstring; return the exit code."""
    from bagel.pipelines.local_runner import OUTPUT_PREFIX
    from bagel.pipelines.progress import ProgressView, format_duration
    from bagel.pipelines.report import collect_reports, render_table, write_report

    started = time.monotonic()
    workdir = settings.workdir
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    log_path = workdir / "logs" / f"{settings.run}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    out.write(f"bagel run --local: run {settings.run!r}, stages {', '.join(settings.stages)}, {settings.nproc} rank(s) per stage\n")
    out.write(f"work directory: {workdir}\nstorage: {settings.storage}\nfull log: {log_path}\n")
    try:
        ensure_demo_data(settings.data_root, out)
    except (RuntimeError, OSError) as error:
        out.write(f"error: {error}\n")
        return ExitCode.FAILURE

    env = dict(os.environ)
    env["BAGEL_DATA_ROOT"] = settings.data_root
    env.pop("BAGEL_LAUNCH_PREEMPT", None)
    if settings.preempt:
        # Read by the train_stage component, which passes it to `bagel launch --preempt`.
        env["BAGEL_LAUNCH_PREEMPT"] = settings.preempt
    spec = {"arguments": settings.arguments, "pipeline_root": str(workdir / "kfp")}
    view = ProgressView(out, settings.nproc)
    pointer: dict = {}
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "bagel.pipelines.local_runner", json.dumps(spec)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=workdir,
        )
        assert process.stdout is not None
        try:
            for line in process.stdout:
                log.write(line)
                log.flush()
                view.feed(line)
                if line.startswith(OUTPUT_PREFIX):
                    pointer = json.loads(line[len(OUTPUT_PREFIX):])
            code = process.wait()
        except KeyboardInterrupt:
            # The terminal's Ctrl-C reached the child too; give its launchers time to checkpoint.
            out.write("\ninterrupted: waiting for the running stage to save its checkpoint ...\n")
            try:
                process.wait(120)
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGKILL)
                process.wait()
            return 130

    outcomes = {stage: (p.outcome if p.outcome != "training" else "failed", p.submissions) for stage, p in view.stages.items()}
    reports = collect_reports(settings.storage, settings.run, settings.stages, outcomes)
    wall = time.monotonic() - started
    summary_path = workdir / f"{settings.run}-summary.json"
    write_report(str(summary_path), settings.run, settings.storage, reports, wall, pointer)
    out.write("\n" + render_table(reports) + "\n\n")
    if code != 0 or not pointer:
        out.write(f"error: the pipeline failed (exit code {code}); the full log is {log_path}\n")
        with open(log_path) as log:
            tail = log.readlines()[-30:]
        out.write("last lines of the log:\n" + "".join(f"  | {line}" for line in tail))
        return ExitCode.FAILURE
    out.write(f"finished in {format_duration(wall)}; summary saved to {summary_path}\n")
    out.write(f"final checkpoint: {pointer['uri']}\n")
    out.write(f"TensorBoard: bagel tensorboard {settings.run} --storage {settings.storage}\n")
    out.flush()
    return ExitCode.SUCCESS

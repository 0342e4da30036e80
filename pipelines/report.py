"""The per-stage summary of a pipeline run: read from storage, printed as a table, saved as JSON.

For each stage it reads `{storage}/runs/{run}/{stage}/summary.json` (written by
the trainer when the stage ends) and `promoted.json` next to it (written by the
pipeline's promotion step: the promoted checkpoint's URI and digest).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from bagel.platform.layout import StageLayout


@dataclass
class StageReport:
    """One stage's row of the summary. Numbers are None where the stage has no summary.json in this run."""

    stage: str
    outcome: str  # "trained", "reused", "failed" or "not run" (an earlier stage failed)
    submissions: int  # launcher submissions this time (0 when reused); more than 1 means preempted and resumed
    steps: int | None = None
    tokens: int | None = None
    first_loss: float | None = None
    last_loss: float | None = None
    final_ce: float | None = None  # None where the stage has no CE tokens
    final_mse: float | None = None  # None where the stage has no MSE tokens (alignment)
    wall_time_s: float | None = None  # the trainer's wall time of the last submission
    goodput: float | None = None  # fraction of wall time spent in productive steps
    promoted_uri: str = ""
    promoted_digest: str = ""


def _read_json(uri: str) -> dict[str, Any] | None:
    from bagel.platform.checkpoint import storage as store

    fs, path = store.open_fs(uri)
    if not fs.exists(path):
        return None
    return store.read_json(fs, path)


def collect_reports(storage: str, run: str, stages: list[str], outcomes: dict[str, tuple[str, int]]) -> list[StageReport]:
    """Read each stage's summary and promotion pointer; `outcomes` maps stage -> (outcome, submissions)."""
    reports = []
    for stage in stages:
        layout = StageLayout(storage, run, stage)
        outcome, submissions = outcomes.get(stage, ("not run", 0))
        report = StageReport(stage=stage, outcome=outcome, submissions=submissions)
        summary = _read_json(layout.summary_uri) or {}
        for key in ("steps", "tokens", "first_loss", "last_loss", "final_ce", "final_mse", "wall_time_s", "goodput"):
            setattr(report, key, summary.get(key))
        pointer = _read_json(f"{layout.stage_dir}/promoted.json") or {}
        report.promoted_uri = pointer.get("uri", "")
        report.promoted_digest = pointer.get("digest", "")
        reports.append(report)
    return reports


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_table(reports: list[StageReport]) -> str:
    """Return the summary as an aligned text table followed by each stage's promoted checkpoint."""
    header = ["stage", "outcome", "steps", "tokens", "loss first->last", "final CE", "final MSE", "wall", "goodput", "digest"]
    rows = []
    for r in reports:
        outcome = r.outcome if r.submissions <= 1 else f"{r.outcome} ({r.submissions} submissions)"
        loss = "-" if r.first_loss is None else f"{r.first_loss:.4f} -> {r.last_loss:.4f}"
        rows.append([
            r.stage,
            outcome,
            "-" if r.steps is None else str(r.steps),
            "-" if r.tokens is None else str(r.tokens),
            loss,
            _number(r.final_ce, 4),
            _number(r.final_mse, 4),
            "-" if r.wall_time_s is None else f"{r.wall_time_s:.1f} s",
            "-" if r.goodput is None else f"{100 * r.goodput:.0f}%",
            r.promoted_digest[:12] or "-",
        ])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    lines.append("")
    lines.append("promoted checkpoints (URI, digest):")
    for r in reports:
        lines.append(f"  {r.stage:<10} {r.promoted_uri or '-'}  {r.promoted_digest or '-'}")
    return "\n".join(lines)


def write_report(
    path: str, run: str, storage: str, reports: list[StageReport], wall_time_s: float, final_checkpoint: dict
) -> None:
    """Save the summary as JSON: {"run", "storage", "wall_time_s", "final_checkpoint", "stages": [StageReport fields]}.

    `final_checkpoint` is the pipeline's output, {"uri", "digest"} of the last stage's promoted checkpoint
    ({} when the pipeline failed).
    """
    payload = {
        "run": run,
        "storage": storage,
        "wall_time_s": wall_time_s,
        "final_checkpoint": final_checkpoint,
        "stages": [asdict(r) for r in reports],
    }
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")

"""Turn a stage config (file + key=value overrides) into the job object of one submission."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bagel.platform.config import ConfigError, load_config_dict
from bagel.platform.jobs.config import JobConfig, job_config_from_dict
from bagel.platform.jobs.pod import StageRun
from bagel.platform.jobs.pytorchjob import build_pytorchjob
from bagel.platform.jobs.trainjob import build_trainjob


@dataclass(frozen=True)
class StagePlan:
    """Everything a launcher needs to submit one stage, derived once from the stage config."""

    stage_run: StageRun
    job: JobConfig
    grace_period_s: int

    def job_object(self, submission: int = 1) -> dict[str, Any]:
        """Return the TrainJob or PyTorchJob of submission number `submission` (1-based)."""
        if self.job.kind == "PyTorchJob":
            return build_pytorchjob(self.job, self.stage_run, self.grace_period_s, submission)
        return build_trainjob(self.job, self.stage_run, self.grace_period_s, submission)


def split_overrides(overrides: list[str] | tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Split overrides into those for the launcher (job.*) and those passed on to `bagel train`.

    run.* overrides are dropped from the pod's list because the launcher passes
    the run identity explicitly.
    """
    launcher, trainer = [], []
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key.startswith("job."):
            launcher.append(item)
        elif not key.startswith("run."):
            trainer.append(item)
    return launcher, trainer


def plan_stage(
    config: str,
    overrides: list[str] | tuple[str, ...] = (),
    run: str | None = None,
    storage: str | None = None,
    init_from: str | None = None,
    stage: str | None = None,
) -> StagePlan:
    """Load the stage config with its overrides and return the plan of its job.

    `run`, `storage`, `init_from` and `stage` replace the config's run section
    when given. Raises ConfigError (a UsageError) on an invalid job section or
    a missing run identity.
    """
    mapping = load_config_dict(config, list(overrides))
    run_section = dict(mapping.get("run") or {})
    for key, value in (("name", run), ("storage", storage), ("init_from", init_from), ("stage", stage)):
        if value is not None:
            run_section[key] = value
    for key in ("name", "stage", "storage"):
        if not run_section.get(key):
            raise ConfigError(f"run.{key} is not set: pass --{'run' if key == 'name' else key} or set it in the config")
    job = job_config_from_dict(mapping.get("job"))
    _, trainer_overrides = split_overrides(overrides)
    try:
        stage_run = StageRun(
            config=config,
            run=run_section["name"],
            stage=run_section["stage"],
            storage=run_section["storage"],
            init_from=run_section.get("init_from") or "",
            overrides=tuple(trainer_overrides),
        )
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return StagePlan(stage_run=stage_run, job=job, grace_period_s=job.grace_period(mapping))

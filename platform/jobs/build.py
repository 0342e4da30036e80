"""Turn a stage config (file + key=value overrides) into the job object of one submission."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from bagel.platform.config import ConfigError, build_run_config, load_config_dict
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


# Variables that the packaged configs interpolate (`${oc.env:...}`). The launcher
# resolves the config with its own environment, so the pods must see the same values.
FORWARDED_ENV = ("BAGEL_DATA_ROOT",)


def _with_forwarded_env(job_section: dict[str, Any] | None) -> dict[str, Any]:
    """Return the job section with each FORWARDED_ENV variable set here added to `job.env`, unless it sets its own."""
    section = dict(job_section or {})
    env = dict(section.get("env") or {})
    for name in FORWARDED_ENV:
        if name in os.environ and name not in env:
            env[name] = os.environ[name]
    if env:
        section["env"] = env
    return section


def check_cluster_storage(storage: str) -> None:
    """Raise ConfigError when `storage` is a local path: in a pod it is the pod's own disk, lost when the pod ends."""
    if storage.startswith("file://") or "://" not in storage:
        raise ConfigError(
            f"run.storage={storage} is a local path, which on Kubernetes is the pod's own disk: checkpoints and "
            "logs would be lost when the pod ends. Pass --storage s3://BUCKET/PREFIX (or set run.storage)"
        )


def check_stage_config(mapping: dict[str, Any], job: JobConfig, world_size: int | None = None) -> None:
    """Run the trainer's own config checks and match the parallel degrees to the processes that will run.

    `world_size` is the number of training processes; None means a cluster
    job's `job.nodes * job.procs`. A misspelled key or degrees that do not fit
    would otherwise fail in every pod, after the cluster has given the job its
    nodes. Raises ConfigError (a UsageError, exit code 2).
    """
    config = build_run_config(mapping)
    config.validate()
    if world_size is not None:
        where = f"{world_size} local processes"
    else:
        world_size = job.nodes * job.procs
        where = (
            f"job.nodes={job.nodes} x {job.procs} processes per node = {world_size}; processes per node are "
            f"job.procs_per_node, else job.gpus_per_node={job.gpus_per_node}"
        )
    try:
        config.parallel.resolve(world_size)
    except ConfigError as error:
        raise ConfigError(f"{error} (the job runs {where})") from None


def plan_stage(
    config: str,
    overrides: list[str] | tuple[str, ...] = (),
    run: str | None = None,
    storage: str | None = None,
    init_from: str | None = None,
    stage: str | None = None,
    world_size: int | None = None,
) -> StagePlan:
    """Load the stage config with its overrides and return the plan of its job.

    `run`, `storage`, `init_from` and `stage` replace the config's run section
    when given. `world_size` is the number of training processes when the
    stage runs on this machine (None: a cluster job of `job.nodes *
    job.procs`). Raises ConfigError (a UsageError) on an invalid config,
    parallel degrees that do not fit, or a missing run identity.
    """
    mapping = load_config_dict(config, list(overrides))
    run_section = dict(mapping.get("run") or {})
    for key, value in (("name", run), ("storage", storage), ("init_from", init_from), ("stage", stage)):
        if value is not None:
            run_section[key] = value
    for key in ("name", "stage", "storage"):
        if not run_section.get(key):
            raise ConfigError(f"run.{key} is not set: pass --{'run' if key == 'name' else key} or set it in the config")
    job = job_config_from_dict(_with_forwarded_env(mapping.get("job")))
    check_stage_config({**mapping, "run": run_section}, job, world_size)
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

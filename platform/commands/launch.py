"""`bagel launch`: run one training stage on Kubernetes (a TrainJob or PyTorchJob) or on this machine."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys

from bagel.platform.exit_codes import ExitCode, UsageError

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `launch` command."""
    parser = subparsers.add_parser(
        "launch",
        help="run a training stage as a Kubernetes job (or locally) until it succeeds, resubmitting after preemption",
        description=(
            "Submit the stage's job, stream the rank-0 log, classify the end (succeeded, preempted, "
            "unschedulable, failed) and resubmit preempted or unschedulable jobs under the same run and "
            "stage within job.retry. Exit codes: 0 succeeded, 2 user error, 75 preempted or unschedulable "
            "after the budget, 1 other failures, 130 interrupted (the job is deleted)."
        ),
    )
    parser.add_argument("--config", required=True, help="stage config: a packaged name (tiny/pretrain) or a YAML path")
    parser.add_argument("--run", help="run name (DNS-1123 label); default: run.name of the config")
    parser.add_argument("--stage", help="stage (alignment, pretrain, continued, sft); default: run.stage of the config")
    parser.add_argument("--storage", help="URI root of checkpoints and logs (s3://bucket/prefix); default: run.storage")
    parser.add_argument("--init-from", help="URI of the promoted checkpoint to start from; default: run.init_from")

    parser.add_argument("--backend", choices=("kubernetes", "local"), default="kubernetes", help="where the stage runs")
    parser.add_argument("--dry-run", action="store_true", help="print the validated job object as YAML and exit")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster config, else ~/.kube/config)")
    parser.add_argument("--context", help="kubeconfig context")
    parser.add_argument("--server", help="API server URL without credentials (test clusters only)")

    parser.add_argument("--nproc-per-node", type=int, default=1, help="local backend: torchrun processes")
    parser.add_argument(
        "--preempt",
        metavar="STAGE:STEP",
        action="append",
        default=[],
        help="local backend: stop STAGE with SIGTERM at STEP once (a preemption drill); repeatable",
    )
    parser.add_argument(
        "--script",
        help="local backend: run this Python file on every rank instead of `bagel train` (to test launch wiring)",
    )

    parser.add_argument("--result-file", help="write the outcome as JSON to this file")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides (job.* for the launcher)")
    parser.set_defaults(func=run_launch)


def preempt_step(specs: list[str], stage: str) -> int | None:
    """Return the step of the `--preempt STAGE:STEP` entry for `stage`, or None."""
    for spec in specs:
        name, _, step = spec.partition(":")
        if not step.isdigit():
            raise UsageError(f"--preempt {spec!r} is invalid: write STAGE:STEP, e.g. pretrain:3")
        if name == stage:
            return int(step)
    return None


def connect(kubeconfig: str | None, context: str | None, server: str | None):
    """Return a kubernetes ApiClient: --server, else the in-cluster service account, else the kubeconfig."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    try:
        return _connect(client, config, kubeconfig, context, server)
    except ConfigException as error:
        raise UsageError(
            f"cannot load the Kubernetes configuration ({error}): pass --kubeconfig FILE and --context NAME, "
            "or run inside the cluster"
        ) from None


def _connect(client, config, kubeconfig: str | None, context: str | None, server: str | None):
    import os

    if server:
        configuration = client.Configuration()
        configuration.host = server
        return client.ApiClient(configuration)
    if not kubeconfig and os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
        return client.ApiClient()
    return config.new_client_from_config(config_file=kubeconfig, context=context)


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_launch(args: argparse.Namespace) -> int:
    from bagel.platform.jobs.build import check_cluster_storage, plan_stage
    from bagel.platform.jobs.yaml_out import dump_yaml
    from bagel.platform.jobs.validate import ValidationError, validate_object

    try:
        world_size = args.nproc_per_node if args.backend == "local" else None
        plan = plan_stage(args.config, args.overrides, args.run, args.storage, args.init_from, args.stage, world_size)
        if args.backend == "kubernetes":
            check_cluster_storage(plan.stage_run.storage)
        preempt = preempt_step(args.preempt, plan.stage_run.stage)
        job_object = plan.job_object()
        validate_object(job_object)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return ExitCode.USAGE_ERROR
    except ValidationError as error:
        print(f"error: the generated job is invalid: {error}", file=sys.stderr)
        return ExitCode.FAILURE

    if args.dry_run:
        dump_yaml(job_object, sys.stdout)
        return ExitCode.SUCCESS

    # Pipeline cancellation stops the step's pod with SIGTERM: treat it like Ctrl-C.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        if args.backend == "local":
            from bagel.platform.launch.local import LocalLauncher

            result = LocalLauncher(plan, nproc=args.nproc_per_node, script=args.script, preempt_at_step=preempt).launch()
        else:
            from bagel.platform.launch.cluster import ClusterLauncher

            result = ClusterLauncher(plan, connect(args.kubeconfig, args.context, args.server), out=sys.stdout).launch()
    except KeyboardInterrupt:
        logger.warning("interrupted; the job was deleted")
        return 130
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return ExitCode.USAGE_ERROR

    summary = {
        "outcome": result.outcome.value,
        "reason": result.reason,
        "message": result.message,
        "exit_code": result.exit_code,
        "submissions": result.submissions,
        "run": plan.stage_run.run,
        "stage": plan.stage_run.stage,
    }
    if args.result_file:
        with open(args.result_file, "w") as handle:
            json.dump(summary, handle)
    if result.outcome.value == "succeeded":
        logger.info("stage %s of run %s succeeded after %d submission(s)", plan.stage_run.stage, plan.stage_run.run, result.submissions)
    else:
        logger.error("stage %s of run %s %s", plan.stage_run.stage, plan.stage_run.run, result.describe())
        for line in result.log_tail[-10:]:
            logger.error("  | %s", line)
    return result.process_exit_code()

"""`bagel pipeline compile`, `bagel submit` and `bagel run --local`."""

import argparse
import json
import logging
import os
import sys

from bagel.platform.exit_codes import ExitCode, UsageError
from bagel.platform.layout import DEFAULT_STORAGE_ENV, DEFAULT_WORKDIR

logger = logging.getLogger(__name__)

STAGES = ("alignment", "pretrain", "continued", "sft")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `pipeline`, `submit` and `run` commands."""
    pipeline = subparsers.add_parser("pipeline", help="build the four-stage Kubeflow pipeline")
    pipeline_commands = pipeline.add_subparsers(dest="pipeline_command", metavar="COMMAND", required=True)
    compile_parser = pipeline_commands.add_parser("compile", help="write the pipeline's IR YAML")
    compile_parser.add_argument("--output", required=True, help="IR YAML file to write")
    _add_build_options(compile_parser)
    compile_parser.set_defaults(func=run_compile)

    submit = subparsers.add_parser("submit", help="start a pipeline run on a Kubeflow Pipelines server")
    submit.add_argument("--host", required=True, help="KFP API server URL, e.g. https://kubeflow.example.com/pipeline")
    submit.add_argument("--experiment", default="bagel", help="experiment name (created if missing)")
    submit.add_argument("--namespace", default="kubeflow", help="KFP namespace (multi-user: your profile namespace)")
    submit.add_argument("--service-account", default="bagel-launcher", help="ServiceAccount of the pipeline's steps")
    submit.add_argument("--run-display-name", help="display name of the KFP run (default: the run name)")
    submit.add_argument("--token", default=os.environ.get("KFP_TOKEN"), help="bearer token (default: $KFP_TOKEN)")
    _add_build_options(submit)
    _add_run_options(submit)
    submit.set_defaults(func=run_submit)

    run = subparsers.add_parser(
        "run",
        help="run the four-stage pipeline on this machine (kfp's local runner, torchrun per stage)",
        description=(
            "Train all four stages on this machine: writes the demo dataset into storage unless it is there, "
            "runs the kfp pipeline with its local runner, each stage under torchrun, promotes each stage's "
            "checkpoint into the next, and prints a per-stage summary. Rerunning reuses the promoted "
            "checkpoints of stages whose config digest is unchanged. Exit codes: 0 succeeded, 1 a stage "
            "failed, 2 invalid arguments, 130 interrupted."
        ),
    )
    run.add_argument("--local", action="store_true", required=True, help="use kfp's local runner (the only mode)")
    run.add_argument(
        "--workdir", default=DEFAULT_WORKDIR, help=f"work directory for logs, the local runner's files and default storage (default: ./{DEFAULT_WORKDIR})"
    )
    run.add_argument("--run", default="local", help="run name (DNS-1123 label; default: local)")
    run.add_argument(
        "--storage",
        help=f"URI root of data, runs and promoted checkpoints, e.g. s3://bucket/prefix "
        f"(default: ${DEFAULT_STORAGE_ENV}, else file://WORKDIR/storage)",
    )
    run.add_argument("--data", help="URI of the demo dataset (default: STORAGE/data; written there if missing)")
    run.add_argument(
        "--config", "--configs", dest="configs", default="tiny",
        help="config family (tiny, small, bagel-7b-mot) or a directory of STAGE.yaml files (default: tiny)",
    )
    run.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages to run, in pipeline order")
    run.add_argument("--nproc", "--nproc-per-node", dest="nproc", type=int, default=2, help="torchrun processes per stage (default: 2)")
    run.add_argument(
        "--preempt", metavar="STAGE:STEP", help="send SIGTERM to STAGE's ranks at STEP once, then resume it (a preemption drill)"
    )
    run.add_argument("--init-from", default="", help="promoted checkpoint URI the first stage starts from")
    run.add_argument("--init-digest", default="", help="digest of --init-from")
    run.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides applied to every stage, e.g. train.steps=10")
    run.set_defaults(func=run_local, node_pool="", job_image="")


def _add_build_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", help="image of the pipeline steps (default: the training image)")
    parser.add_argument("--storage-secret", default="bagel-storage", help="Secret with the storage credentials ('' for none)")
    parser.add_argument(
        "--step-node-selector",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="node label of the pipeline's own step pods (CPU only; repeatable)",
    )
    parser.add_argument(
        "--step-env",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="environment variable of the pipeline's own step pods, e.g. AWS_ENDPOINT_URL=https://s3.example.com "
        "or BAGEL_DATA_ROOT=s3://bucket/data, which launch steps also pass on to the training pods (repeatable)",
    )


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run name (DNS-1123 label)")
    parser.add_argument("--storage", required=True, help="URI root of runs and promoted checkpoints")
    parser.add_argument("--configs", default="bagel-7b-mot", help="config family (tiny, small, bagel-7b-mot) or a directory of STAGE.yaml")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages to run, in pipeline order")
    parser.add_argument("--init-from", default="", help="promoted checkpoint URI the first stage starts from")
    parser.add_argument("--init-digest", default="", help="digest of --init-from")
    parser.add_argument("--node-pool", default="", help='JSON node selector of the training pods, e.g. {"pool": "h100"}')
    parser.add_argument("--job-image", default="", help="training image of the jobs (default: job.image of the configs)")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE overrides applied to every stage")


def pipeline_arguments(args: argparse.Namespace, backend: str) -> dict:
    """Return the pipeline's parameter values from the command line; raises ValueError on bad --stages/--node-pool."""
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown or not stages:
        raise ValueError(f"--stages {args.stages!r} is invalid: use a comma-separated subset of {', '.join(STAGES)}")
    if args.node_pool:
        try:
            selector = json.loads(args.node_pool)
        except json.JSONDecodeError:
            selector = None
        if not isinstance(selector, dict):
            raise ValueError(f'--node-pool {args.node_pool!r} is invalid: write a JSON object such as {{"pool": "h100"}}')
    arguments = {
        "run_name": args.run,
        "storage": args.storage,
        "configs": args.configs,
        "init_from": args.init_from,
        "init_digest": args.init_digest,
        "image": args.job_image,
        "node_pool": args.node_pool,
        "backend": backend,
        "overrides": json.dumps(list(args.overrides)) if args.overrides else "",
    }
    for stage in STAGES:
        arguments[f"run_{stage}"] = stage in stages
    return arguments


def _build(args: argparse.Namespace):
    from bagel.pipelines.components import DEFAULT_IMAGE
    from bagel.pipelines.pipeline import build_pipeline

    selector = _key_values(args.step_node_selector, "--step-node-selector", "pool=cpu")
    step_env = _key_values(args.step_env, "--step-env", "AWS_ENDPOINT_URL=https://s3.example.com")
    return build_pipeline(args.image or DEFAULT_IMAGE, args.storage_secret, selector, step_env)


def _key_values(items: list[str], option: str, example: str) -> dict[str, str]:
    """Parse repeated KEY=VALUE options; raises ValueError naming the option and an example."""
    parsed = {}
    for item in items:
        key, separator, value = item.partition("=")
        if not separator or not key:
            raise ValueError(f"{option} {item!r} is invalid: write KEY=VALUE, e.g. {example}")
        parsed[key] = value
    return parsed


def run_compile(args: argparse.Namespace) -> int:
    from kfp import compiler

    from bagel.pipelines.pipeline import PIPELINE_NAME

    try:
        pipeline = _build(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return ExitCode.USAGE_ERROR
    compiler.Compiler().compile(pipeline, package_path=args.output, pipeline_name=PIPELINE_NAME)
    print(f"wrote {args.output}")
    return ExitCode.SUCCESS


def check_stage_configs(args: argparse.Namespace, stages: list[str]) -> None:
    """Check the storage and every selected stage's config as `bagel launch` will, before the run is created.

    A config that exists only inside the cluster's image or ConfigMap cannot
    be checked here; it is skipped with a warning. Raises UsageError.
    """
    from bagel.platform.config import ConfigError, config_path
    from bagel.pipelines.config_names import stage_config_name
    from bagel.platform.jobs.build import check_cluster_storage, plan_stage

    check_cluster_storage(args.storage)
    for stage in stages:
        name = stage_config_name(args.configs, stage)
        try:
            config_path(name)
        except ConfigError:
            logger.warning("config %s is not on this machine, so it is checked only when its stage starts", name)
            continue
        plan_stage(name, list(args.overrides), run=args.run, storage=args.storage, stage=stage)


def run_submit(args: argparse.Namespace) -> int:
    import tempfile

    import kfp
    from kfp import compiler

    from bagel.pipelines.pipeline import PIPELINE_NAME

    try:
        arguments = pipeline_arguments(args, backend="kubernetes")
        check_stage_configs(args, [stage for stage in STAGES if arguments[f"run_{stage}"]])
        pipeline = _build(args)
    except (ValueError, UsageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return ExitCode.USAGE_ERROR
    with tempfile.TemporaryDirectory() as directory:
        package = os.path.join(directory, "bagel-pipeline.yaml")
        compiler.Compiler().compile(pipeline, package_path=package, pipeline_name=PIPELINE_NAME)
        client = kfp.Client(host=args.host, namespace=args.namespace, existing_token=args.token)
        result = client.create_run_from_pipeline_package(
            package,
            arguments=arguments,
            run_name=args.run_display_name or args.run,
            experiment_name=args.experiment,
            namespace=args.namespace,
            service_account=args.service_account,
        )
    print(json.dumps({"run_id": result.run_id}))
    return ExitCode.SUCCESS


def _preempt_spec(spec: str, stages: list[str]) -> str:
    """Return `spec` if it is STAGE:STEP with a selected stage and a step >= 1, else raise ValueError."""
    stage, _, step = spec.partition(":")
    if stage not in stages or not step.isdigit() or int(step) < 1:
        raise ValueError(f"--preempt {spec!r} is invalid: write STAGE:STEP with STAGE one of {', '.join(stages)}, e.g. pretrain:5")
    return spec


def run_local(args: argparse.Namespace) -> int:
    from pathlib import Path

    from bagel.pipelines.local import LocalRun, run_local_pipeline
    from bagel.platform.layout import default_storage, validate_run_name

    workdir = Path(args.workdir).resolve()
    if Path(args.configs).is_dir():
        # The pipeline runs in the work directory, so a relative config directory must become absolute.
        args.configs = str(Path(args.configs).resolve())
    args.storage = (args.storage or os.environ.get(DEFAULT_STORAGE_ENV) or default_storage(str(workdir))).rstrip("/")
    try:
        validate_run_name(args.run)
        if args.nproc < 1:
            raise ValueError(f"--nproc {args.nproc} is invalid: use 1 or more processes")
        arguments = pipeline_arguments(args, backend="local")
        stages = [stage for stage in STAGES if arguments[f"run_{stage}"]]
        preempt = _preempt_spec(args.preempt, stages) if args.preempt else ""
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return ExitCode.USAGE_ERROR
    arguments["nproc_per_node"] = args.nproc
    storage = args.storage
    settings = LocalRun(
        workdir=workdir,
        run=args.run,
        storage=storage,
        data_root=args.data or f"{storage}/data",
        arguments=arguments,
        stages=stages,
        nproc=args.nproc,
        preempt=preempt,
    )
    workdir.mkdir(parents=True, exist_ok=True)
    return run_local_pipeline(settings)

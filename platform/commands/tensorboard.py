"""`bagel tensorboard [RUN]`: serve a run's TensorBoard logs on 127.0.0.1.

RUN is a run name under `--storage` (every stage of the run appears as its
own TensorBoard run), a log-directory URI (`s3://...`, `file://...`) or a
local path; without RUN, every run under `--storage` is served. The default
storage is the one `bagel run --local` uses: $BAGEL_STORAGE, else
`file://WORKDIR/storage` with `--workdir` (default ./bagel-work), so after
`bagel run --local` the command `bagel tensorboard local` shows that run.
"""

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from bagel.platform.exit_codes import ExitCode, UsageError
from bagel.platform.layout import DEFAULT_STORAGE_ENV, DEFAULT_WORKDIR, default_storage
from bagel.platform.processes import stop_process
from bagel.platform.s3_endpoint import resolve_endpoint

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tensorboard",
        help="serve a run's TensorBoard logs (local or s3://) on 127.0.0.1",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run", nargs="?", default=None, help="run name, log-directory URI or path (default: all runs)")
    parser.add_argument(
        "--storage",
        default=None,
        help=f"storage root of the runs (default: ${DEFAULT_STORAGE_ENV}, else file://WORKDIR/storage)",
    )
    parser.add_argument(
        "--workdir", default=DEFAULT_WORKDIR, help=f"work directory of `bagel run --local` (default: ./{DEFAULT_WORKDIR})"
    )
    parser.add_argument("--port", type=int, default=6006, help="TCP port on 127.0.0.1 (0 picks a free one)")
    parser.add_argument(
        "--reload-interval", type=int, default=5, help="seconds between rescans of the log directory"
    )
    parser.set_defaults(func=run_tensorboard)


def resolve_logdir(run: str | None, storage: str) -> str:
    """Map the RUN argument to the directory TensorBoard reads (a local path or an s3:// URI)."""
    if run is None:
        uri = f"{storage.rstrip('/')}/runs"
    elif "://" in run or Path(run).exists():
        uri = run
    else:
        uri = f"{storage.rstrip('/')}/runs/{run}"

    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if "://" in uri:
        if not uri.startswith("s3://"):
            raise UsageError(f"unsupported log directory {uri!r}: use s3://, file:// or a local path")
        return uri
    if not Path(uri).exists():
        raise UsageError(f"log directory {uri} not found: check the run name and --storage")
    return str(Path(uri).resolve())


def tensorboard_environment(logdir: str) -> dict[str, str]:
    """Return the environment for TensorBoard; for s3:// it needs an explicit endpoint."""
    env = dict(os.environ)
    if logdir.startswith("s3://"):
        # Without TensorFlow, TensorBoard reads s3:// through boto3 and takes the
        # endpoint from S3_ENDPOINT; without one it would go to the public AWS endpoint.
        endpoint = env.get("S3_ENDPOINT") or resolve_endpoint(None)
        if endpoint:
            env["S3_ENDPOINT"] = endpoint
        else:
            logger.warning("no S3_ENDPOINT or AWS_ENDPOINT_URL set: TensorBoard uses the default AWS endpoint")
    return env


def run_tensorboard(args: argparse.Namespace) -> int:
    storage = args.storage or os.environ.get(DEFAULT_STORAGE_ENV) or default_storage(args.workdir)
    logdir = resolve_logdir(args.run, storage)
    executable = shutil.which("tensorboard") or str(Path(sys.executable).with_name("tensorboard"))
    command = [
        executable,
        "--logdir",
        logdir,
        "--host",
        "127.0.0.1",
        "--port",
        str(args.port),
        "--reload_interval",
        str(args.reload_interval),
    ]
    logger.info("starting TensorBoard on %s", logdir)
    process = subprocess.Popen(command, env=tensorboard_environment(logdir), stderr=subprocess.PIPE, text=True)

    # SIGTERM (a service manager, `kill`, a pod stopping) ends this command like
    # Ctrl-C, so the `finally` below stops TensorBoard instead of orphaning it.
    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        # TensorBoard announces its URL on stderr ("TensorBoard 2.x at http://...");
        # echo that line to stdout so scripts and people can pick up the URL.
        assert process.stderr is not None
        for line in process.stderr:
            sys.stderr.write(line)
            if " at http://" in line:
                url = line.split(" at ", 1)[1].split()[0]
                print(f"TensorBoard: {url}", flush=True)
        return ExitCode.SUCCESS if process.wait() == 0 else ExitCode.FAILURE
    except KeyboardInterrupt:
        return ExitCode.SUCCESS
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop_process(process)

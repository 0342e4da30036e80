"""The `bagel` command line.

Command groups are plugins: each entry point in the `bagel.commands` group
names a `register(subparsers)` function that adds its sub-commands and sets
`func` on them. This keeps bagel.platform free of kfp, whose commands
register themselves from bagel.pipelines.
"""

import argparse
import logging
import sys
from importlib.metadata import entry_points

from bagel.platform.exit_codes import ExitCode, UsageError
from bagel.platform.log import setup_logging

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bagel",
        description="Train BAGEL (unified multimodal Mixture-of-Transformers) locally or on Kubernetes.",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level: DEBUG, INFO, WARNING or ERROR")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")

    for entry_point in sorted(entry_points(group="bagel.commands"), key=lambda e: e.name):
        register = entry_point.load()
        register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    if not hasattr(args, "func"):
        parser.print_help()
        return ExitCode.SUCCESS
    try:
        return int(args.func(args) or ExitCode.SUCCESS)
    except UsageError as error:
        # Bad input is the user's to fix: one clear line, no traceback, and an
        # exit code that launchers never retry.
        logger.error("%s", error)
        return ExitCode.USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())

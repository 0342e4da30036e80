"""`bagel tensorboard` commands."""

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `tensorboard` command group (not implemented yet)."""

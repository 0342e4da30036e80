"""`bagel train` commands."""

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `train` command group (not implemented yet)."""

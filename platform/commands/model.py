"""`bagel model` commands."""

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `model` command group (not implemented yet)."""

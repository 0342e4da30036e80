"""`bagel data` commands."""

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `data` command group (not implemented yet)."""

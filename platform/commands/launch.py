"""`bagel launch` commands."""

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `launch` command group (not implemented yet)."""

"""`bagel ckpt` commands."""

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `ckpt` command group (not implemented yet)."""

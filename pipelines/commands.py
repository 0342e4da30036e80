"""`bagel pipeline`, `bagel submit` and `bagel run` commands."""

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the pipeline commands (not implemented yet)."""

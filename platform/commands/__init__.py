"""Command groups of the `bagel` command line, one module each (see bagel.platform.cli)."""

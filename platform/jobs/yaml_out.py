"""YAML output of job objects for people to read and for `kubectl apply -f`."""

from __future__ import annotations

from typing import IO, Any

import yaml


class _NoAliasDumper(yaml.SafeDumper):
    """SafeDumper that writes a repeated object out in full every time.

    The job builders reuse one dict (the pod labels, for example) in several
    places. yaml.safe_dump would then emit an anchor and aliases
    (`&id001`/`*id001`), which is valid YAML but hard to read and edit.
    """

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump_yaml(obj: Any, stream: IO[str] | None = None) -> str | None:
    """Write `obj` as block-style YAML in key order, without anchors or aliases.

    Returns the YAML text when `stream` is None, as yaml.dump does. Otherwise
    it writes to `stream` and returns None.
    """
    return yaml.dump(obj, stream, Dumper=_NoAliasDumper, sort_keys=False, default_flow_style=False)

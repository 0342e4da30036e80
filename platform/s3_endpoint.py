"""One rule for the S3 endpoint of every filesystem that data, checkpoint and TensorBoard storage open.

The endpoint is the first of these that is set:

1. `storage_options["endpoint_url"]`, then `storage_options["client_kwargs"]["endpoint_url"]`
   (the config's `data.storage_options` or `checkpoint.storage_options`)
2. the environment variable AWS_ENDPOINT_URL
3. the environment variable FSSPEC_S3_ENDPOINT_URL
4. fsspec's configuration (`fsspec.config.conf["s3"]`: its config files, and
   the FSSPEC_S3_* variables as they were when fsspec was imported)

A warning names the sources when 1 to 3 set different endpoints.

The rule is needed because s3fs takes the endpoint in two places, its own
`endpoint_url` argument (which fsspec fills from FSSPEC_S3_ENDPOINT_URL) and
`client_kwargs`. When the two differ, botocore fails with
`TypeError: create_client() got multiple values for keyword argument 'endpoint_url'`.
So the resolved endpoint is passed once, as `endpoint_url`, and removed from
`client_kwargs`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

S3_PROTOCOLS = ("s3", "s3a")

# Conflicts already reported in this process: new_filesystem runs once per
# shard and per DataLoader worker, so each conflict is logged once.
_reported_conflicts: set[tuple[tuple[str, str], ...]] = set()


def is_s3_uri(uri: str) -> bool:
    """Return True for `s3://` and `s3a://` URIs."""
    return "://" in uri and uri.split("://", 1)[0] in S3_PROTOCOLS


def _fsspec_config_endpoint() -> str | None:
    import fsspec.config

    return fsspec.config.conf.get("s3", {}).get("endpoint_url") or None


def endpoint_sources(storage_options: dict[str, Any] | None) -> list[tuple[str, str]]:
    """Return the (source, endpoint) pairs that are set, highest precedence first."""
    options = storage_options or {}
    candidates = [
        ("storage_options endpoint_url", options.get("endpoint_url")),
        ("storage_options client_kwargs.endpoint_url", (options.get("client_kwargs") or {}).get("endpoint_url")),
        ("AWS_ENDPOINT_URL", os.environ.get("AWS_ENDPOINT_URL")),
        ("FSSPEC_S3_ENDPOINT_URL", os.environ.get("FSSPEC_S3_ENDPOINT_URL")),
    ]
    return [(source, endpoint) for source, endpoint in candidates if endpoint]


def resolve_endpoint(storage_options: dict[str, Any] | None) -> str | None:
    """Return the S3 endpoint URL that the rule in the module docstring selects, or None for AWS's default."""
    sources = endpoint_sources(storage_options)
    if not sources:
        return _fsspec_config_endpoint()
    chosen_source, chosen = sources[0]
    differing = tuple((source, endpoint) for source, endpoint in sources[1:] if endpoint != chosen)
    if differing and differing not in _reported_conflicts:
        _reported_conflicts.add(differing)
        others = ", ".join(f"{source}={endpoint}" for source, endpoint in differing)
        logger.warning(
            "S3 endpoint settings differ: using %s from %s, ignoring %s "
            "(precedence: storage_options, AWS_ENDPOINT_URL, FSSPEC_S3_ENDPOINT_URL)",
            chosen, chosen_source, others,
        )
    return chosen


def with_s3_endpoint(uri: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """Return a copy of `storage_options` with the resolved endpoint as `endpoint_url` when `uri` is on S3."""
    options = dict(storage_options or {})
    if not is_s3_uri(uri):
        return options
    endpoint = resolve_endpoint(options)
    client_kwargs = dict(options.get("client_kwargs") or {})
    client_kwargs.pop("endpoint_url", None)
    options["client_kwargs"] = client_kwargs
    if endpoint:
        # Passed explicitly, it also overrides the endpoint in fsspec's configuration.
        options["endpoint_url"] = endpoint
    return options

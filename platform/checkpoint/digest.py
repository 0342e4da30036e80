"""The config digest: the identity of a stage's training inputs, used to reuse a promoted checkpoint.

Two stage runs with equal digests train the same model on the same data from
the same start, so a pipeline re-run may take the first run's promoted
checkpoint instead of training again. The digest covers
- the resolved stage config, minus `run.name`, `run.storage` and
  `run.init_from` (the start is covered by its content digest, below) and
  minus every `storage_options` mapping (credentials and endpoints);
- the content digest of the `run.init_from` checkpoint ("" when fresh);
- the SHA-256 of each dataset manifest the `data` section names.
"""

import hashlib
import json
import logging
from typing import Any

from bagel.platform.checkpoint import storage
from bagel.platform.checkpoint.manifest import read_manifest

logger = logging.getLogger(__name__)

_EXCLUDED_RUN_KEYS = ("name", "storage", "init_from")


def config_digest(config: dict[str, Any], init_from_digest: str, data_manifest_digests: dict[str, str]) -> str:
    """Return the hex SHA-256 of the canonical JSON of the stage's inputs (see the module docstring)."""
    payload = {
        "config": _strip(config),
        "init_from": init_from_digest,
        "data_manifests": dict(sorted(data_manifest_digests.items())),
    }
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def data_manifest_digests(config: dict[str, Any], storage_options: dict[str, Any] | None = None) -> dict[str, str]:
    """Return {dataset uri: SHA-256 of its manifest file} for the datasets of `config["data"]`."""
    digests = {}
    for dataset in (config.get("data") or {}).get("datasets") or []:
        uri = dataset["uri"]
        fs, path = storage.open_fs(uri, storage_options)
        try:
            digests[uri] = storage.sha256_file(fs, path)
        except FileNotFoundError:
            raise FileNotFoundError(f"data manifest {uri} not found: the config digest needs every dataset manifest") from None
    return digests


def checkpoint_content_digest(uri: str, storage_options: dict[str, Any] | None = None) -> str:
    """Return the content digest of a checkpoint: a promoted one's own digest, else the SHA-256 of its MANIFEST."""
    if not uri:
        return ""
    fs, path = storage.open_fs(uri, storage_options)
    manifest = read_manifest(fs, path)
    if manifest is None:
        raise FileNotFoundError(f"{uri} has no MANIFEST: it is not a complete checkpoint")
    promoted = manifest.extra.get("promoted") or {}
    if promoted.get("digest"):
        return str(promoted["digest"])
    return hashlib.sha256(json.dumps(manifest.to_json(), sort_keys=True).encode()).hexdigest()


def _strip(config: dict[str, Any]) -> dict[str, Any]:
    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k != "storage_options"}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    result = strip(config)
    run = dict(result.get("run") or {})
    for key in _EXCLUDED_RUN_KEYS:
        run.pop(key, None)
    result["run"] = run
    return result


"""OpenAPI v3 schemas of the custom resources that bagel-platform creates.

Each JSON file contains `spec.versions[].schema.openAPIV3Schema` of one served
CRD version with the `description` texts removed (they are most of the size):

    trainjobs / trainingruntimes / clustertrainingruntimes  Kubeflow Trainer v2.3.0 (commit 658725bdae5c)
    pytorchjobs                                             Kubeflow training-operator v1.9.4 (commit 4445c12aa62e)
    jobsets                                                 JobSet v0.12.0, the version Trainer v2.3.0 pins (commit f22e565ac3cc)

The sources are the generated CRD manifests of kubeflow/trainer
(`manifests/base/crds/`) and kubernetes-sigs/jobset
(`config/components/crd/bases/`), both Apache-2.0.
"""

import json
from functools import cache
from pathlib import Path
from typing import Any

_DIR = Path(__file__).parent


@cache
def crd_schema(api_version: str, kind: str) -> dict[str, Any] | None:
    """Return the stored openAPIV3Schema of `kind` in `api_version` (group/version), or None if none is stored."""
    group, _, version = api_version.rpartition("/")
    for path in _DIR.glob("*.json"):
        document = json.loads(path.read_text())
        if document["group"] == group and document["version"] == version and document["kind"] == kind:
            return document["openAPIV3Schema"]
    return None

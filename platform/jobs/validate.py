"""Strict validation of every object bagel-platform generates, before anything reaches a cluster.

* Custom resources (TrainJob, ClusterTrainingRuntime, PyTorchJob, JobSet) are
  checked against their CRD schemas made strict: every object schema with
  `properties` gets `additionalProperties: false` unless it preserves unknown
  fields. An API server silently prunes unknown fields, so a misspelt or
  outdated field (`podTemplateOverrides` on Trainer v2.3) would otherwise be
  dropped without a word. Their `metadata` is checked against ObjectMeta.
* Core kinds are checked against kubernetes-validate's strict schemas.
* JSON Schema does not evaluate the CRDs' CEL rules. The one that matters
  for generated names (RFC-1035 label, at most 63 characters) is checked here.
"""

from __future__ import annotations

import copy
import re
from functools import cache
from typing import Any

import jsonschema

from bagel.platform.jobs.crds import crd_schema

KUBERNETES_VERSION = "1.37"
_RFC1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")

# Kinds without a stored CRD schema, checked against these hand-written schemas
# of the fields the chart sets (Kueue v1beta2 LocalQueue: spec.clusterQueue, spec.stopPolicy).
_EXTRA_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("kueue.x-k8s.io/v1beta2", "LocalQueue"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": {
                "type": "object",
                "required": ["clusterQueue"],
                "properties": {
                    "clusterQueue": {"type": "string", "maxLength": 253},
                    "stopPolicy": {"type": "string", "enum": ["None", "Hold", "HoldAndDrain"]},
                },
            },
        },
    },
}


class ValidationError(ValueError):
    """A generated object does not match its schema; the message names the object and the field path."""


def make_strict(schema: Any) -> Any:
    """Return a copy of an OpenAPI schema in which objects with `properties` reject unknown fields."""
    schema = copy.deepcopy(schema)

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(schema)
    return schema


@cache
def _crd_validator(api_version: str, kind: str) -> jsonschema.Draft7Validator | None:
    schema = crd_schema(api_version, kind)
    if schema is None:
        schema = _EXTRA_SCHEMAS.get((api_version, kind))
    if schema is None:
        return None
    return jsonschema.Draft7Validator(make_strict(schema))


def _describe(error: jsonschema.ValidationError) -> str:
    path = ".".join(str(part) for part in error.absolute_path) or "(root)"
    return f"{path}: {error.message}"


def _object_name(obj: dict[str, Any]) -> str:
    metadata = obj.get("metadata") or {}
    return f"{obj.get('kind', '?')} {metadata.get('namespace', '') + '/' if metadata.get('namespace') else ''}{metadata.get('name', '?')}"


def _validate_core(obj: dict[str, Any]) -> None:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        # kubernetes_validate.ValidationError copies the jsonschema error's attributes.
        raise ValidationError(f"{_object_name(obj)} is invalid at {_describe(error)}") from None
    except kubernetes_validate.SchemaNotFoundError:
        raise ValidationError(
            f"{_object_name(obj)}: no Kubernetes {KUBERNETES_VERSION} schema for apiVersion {obj.get('apiVersion')!r} "
            f"kind {obj.get('kind')!r}; fix the apiVersion or add the CRD schema to bagel.platform.jobs.crds"
        ) from None


def _validate_metadata(obj: dict[str, Any]) -> None:
    """Check a custom resource's metadata against the strict ObjectMeta schema of Kubernetes."""
    wrapper = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj.get("metadata", {})}
    try:
        _validate_core(wrapper)
    except ValidationError as error:
        raise ValidationError(str(error).replace("ConfigMap ", f"{obj.get('kind')} ", 1)) from None


def validate_object(obj: dict[str, Any]) -> None:
    """Raise ValidationError unless `obj` matches its strict schema (CRD or core kind)."""
    if not isinstance(obj, dict) or "apiVersion" not in obj or "kind" not in obj:
        raise ValidationError(f"not a Kubernetes object (apiVersion and kind are required): {str(obj)[:200]}")
    validator = _crd_validator(obj["apiVersion"], obj["kind"])
    if validator is None:
        _validate_core(obj)
        return

    errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
    if errors:
        details = "; ".join(_describe(e) for e in errors[:5])
        raise ValidationError(f"{_object_name(obj)} is invalid: {details}")
    _validate_metadata(obj)
    name = (obj.get("metadata") or {}).get("name", "")
    if obj["kind"] in ("TrainJob", "ClusterTrainingRuntime", "TrainingRuntime") and not (
        _RFC1035.match(name) and len(name) <= 63
    ):
        raise ValidationError(
            f"{_object_name(obj)}: metadata.name must be an RFC-1035 label (a letter first, at most 63 characters)"
        )


def validate_objects(objects: list[dict[str, Any]]) -> None:
    """Validate each object; the first failure raises."""
    for obj in objects:
        validate_object(obj)

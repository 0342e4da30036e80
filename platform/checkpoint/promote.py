"""Promotion: validate a stage's final checkpoint and publish its weights as the next stage's start.

A promoted checkpoint `{storage}/promoted/{digest}/` is a DCP checkpoint of
two states, `model` and `ema` (complete weight sets keyed by the released
checkpoint's names), committed by a MANIFEST whose `extra.promoted` holds the
metadata: stage, steps, tokens, config digest, data manifest digests, source
run and checkpoint, the model spec (name + overrides) and any resize applied.

`digest` is the SHA-256 of the weights (key, dtype, shape and bytes of every
tensor) and of the config digest, so identical inputs give the same
directory, which is written once and never modified: publishing content that
already exists returns the existing checkpoint with `reused=True`.

Validation rejects, naming each offending key: a non-finite weight, a key the
next stage's model lacks or needs, and a shape that differs. The sin-cos
position tables (`vit_pos_embed.pos_embed`, `latent_pos_embed.pos_embed`) are
a pure function of the grid size, so a changed `max_latent_size` or
`vit_max_num_patch_per_side` regenerates them, with a log line and a record
in the metadata.
"""

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from bagel.platform.checkpoint import storage
from bagel.platform.checkpoint.listing import CheckpointEntry, find_checkpoints, inspect_checkpoint
from bagel.platform.checkpoint.manifest import check_checksums
from bagel.platform.checkpoint.reader import WholeFileReader
from bagel.platform.checkpoint.states import clean_fqn
from bagel.platform.checkpoint.writer import ManifestWriter
from bagel.platform.exit_codes import UsageError
from bagel.platform.layout import promoted_dir

logger = logging.getLogger(__name__)

WEIGHT_STATES = ("model", "ema")
# Sin-cos tables and the config field that sets their grid side.
_POSITION_TABLES = {
    "vit_pos_embed.pos_embed": "vit_max_num_patch_per_side",
    "latent_pos_embed.pos_embed": "max_latent_size",
}


class PromotionError(UsageError):
    """A checkpoint that must not be promoted; the message lists every problem with its key."""


@dataclass
class PromotedCheckpoint:
    uri: str
    digest: str
    reused: bool  # True when identical content was already published
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"uri": self.uri, "digest": self.digest, "reused": self.reused}


def read_weights(uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Read the full (unsharded) `model` and `ema` tensors of a checkpoint into CPU memory, in one process.

    Returns {"model": {name: tensor}, "ema": {name: tensor}} with canonical
    names; "ema" is absent when the checkpoint has none.
    NOTE: this keeps the whole model (and EMA) in host memory: about 58 GB per
    copy for BAGEL-7B-MoT in fp32.
    """
    reader = FsspecReader(uri, **(storage_options or {}))
    metadata = reader.read_metadata()
    targets: dict[str, torch.Tensor] = {}
    for key, item in metadata.state_dict_metadata.items():
        state = key.split(".", 1)[0]
        if state in WEIGHT_STATES and isinstance(item, TensorStorageMetadata):
            targets[key] = torch.empty(item.size, dtype=item.properties.dtype)
    if not any(key.startswith("model.") for key in targets):
        raise PromotionError(f"{uri} contains no model weights (no 'model.*' tensors): it is not a training or promoted checkpoint")
    dcp.load(targets, storage_reader=WholeFileReader(uri, **(storage_options or {})), no_dist=True)
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in targets.items():
        state, name = key.split(".", 1)
        weights.setdefault(state, {})[clean_fqn(name)] = tensor
    return weights


def expected_shapes(model_config: Any) -> dict[str, tuple[int, ...]]:
    """Return {key: shape} of every tensor in a `Bagel` built from `model_config` (built on the meta device)."""
    from bagel.model.bagel import Bagel

    with torch.device("meta"):
        model = Bagel(model_config)
    return {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}


def regenerate_position_table(key: str, model_config: Any) -> torch.Tensor:
    """Return the sin-cos table `key` as the next stage's config defines it."""
    from bagel.model.embeddings import PositionEmbedding

    side = getattr(model_config, _POSITION_TABLES[key])
    table = PositionEmbedding(side, model_config.llm.hidden_size)
    table.reset_parameters()
    return table.pos_embed.detach()


def validate_weights(
    weights: dict[str, dict[str, torch.Tensor]], model_config: Any, source: str
) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """Check `weights` against the next stage's model and return (complete model and EMA weights, resizes applied).

    Raises PromotionError listing every non-finite tensor, missing key,
    unexpected key and shape mismatch. EMA keys absent from the checkpoint
    (frozen parameters, which an EMA does not track) are filled from the model.
    """
    expected = expected_shapes(model_config)
    model = weights["model"]
    ema = weights.get("ema")
    problems: list[str] = []

    for state_name, state in (("model", model), ("ema", ema or {})):
        for key, tensor in sorted(state.items()):
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                problems.append(f"{state_name} weight {key} has {bad} non-finite values (NaN or Inf)")

    for key in sorted(set(expected) - set(model)):
        problems.append(f"missing key {key} (the next stage's model needs shape {expected[key]})")
    for key in sorted(set(model) - set(expected)):
        problems.append(f"unexpected key {key} (shape {tuple(model[key].shape)}) is not in the next stage's model")
    if ema is not None:
        for key in sorted(set(ema) - set(expected)):
            problems.append(f"unexpected EMA key {key} is not in the next stage's model")

    resized: list[str] = []
    for key in sorted(set(model) & set(expected)):
        found = tuple(model[key].shape)
        if found == expected[key]:
            continue
        if key in _POSITION_TABLES:
            message = f"{key}: resized {found} -> {expected[key]} by regenerating the sin-cos table ({_POSITION_TABLES[key]}={getattr(model_config, _POSITION_TABLES[key])})"
            logger.warning("promotion of %s: %s", source, message)
            resized.append(message)
            continue
        problems.append(f"shape mismatch for {key}: checkpoint {found}, next stage's model {expected[key]}")
    if ema is not None:
        for key in sorted(set(ema) & set(expected)):
            if key not in _POSITION_TABLES and tuple(ema[key].shape) != expected[key]:
                problems.append(f"shape mismatch for EMA {key}: checkpoint {tuple(ema[key].shape)}, next stage's model {expected[key]}")

    if problems:
        listed = "\n  ".join(problems[:30])
        more = f"\n  ... and {len(problems) - 30} more" if len(problems) > 30 else ""
        raise PromotionError(f"{source} cannot be promoted ({len(problems)} problems):\n  {listed}{more}")

    new_model = dict(model)
    for key in _POSITION_TABLES:
        if key in new_model and tuple(new_model[key].shape) != expected[key]:
            new_model[key] = regenerate_position_table(key, model_config).to(model[key].dtype)
    if ema is None:
        logger.warning("promotion of %s: no EMA in the checkpoint, so the EMA weights are the model weights", source)
        new_ema = dict(new_model)
    else:
        filled = sorted(set(new_model) - set(ema))
        if filled:
            logger.info("promotion of %s: %d tensors without EMA (frozen or buffers) taken from the model", source, len(filled))
        new_ema = {key: ema[key] if key in ema and key not in _POSITION_TABLES else new_model[key] for key in new_model}
    return {"model": new_model, "ema": new_ema}, resized


def content_digest(weights: dict[str, dict[str, torch.Tensor]], config_digest: str) -> str:
    """Return the SHA-256 (hex) over every tensor's state, name, dtype, shape and bytes, and the config digest."""
    digest = hashlib.sha256(config_digest.encode())
    for state_name in WEIGHT_STATES:
        for key in sorted(weights.get(state_name, {})):
            tensor = weights[state_name][key].detach().contiguous().cpu()
            digest.update(f"{state_name}.{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def publish(
    storage_root: str,
    weights: dict[str, dict[str, torch.Tensor]],
    metadata: dict[str, Any],
    *,
    step: int = 0,
    storage_options: dict[str, Any] | None = None,
) -> PromotedCheckpoint:
    """Write `weights` to `{storage_root}/promoted/{digest}` unless that content is already there."""
    digest = content_digest(weights, str(metadata.get("config_digest", "")))
    uri = promoted_dir(storage_root, digest)
    existing = inspect_checkpoint(uri, storage_options)
    if existing.complete:
        logger.info("promoted checkpoint %s already exists: reusing it", uri)
        return PromotedCheckpoint(uri, digest, True, existing.manifest.extra.get("promoted", {}))
    fs, path = storage.open_fs(uri, storage_options)
    if existing.size_bytes:
        logger.warning("removing the unfinished promotion at %s (%s)", uri, existing.status)
        storage.remove_tree(fs, path)

    record = {**metadata, "digest": digest, "created_unix": time.time()}
    writer = ManifestWriter(uri, step=step, world_size=1, extra={"promoted": record}, **(storage_options or {}))
    dcp.save(weights, storage_writer=writer, no_dist=True)
    logger.info("published promoted checkpoint %s (%s, %d steps)", uri, metadata.get("stage", "?"), step)
    return PromotedCheckpoint(uri, digest, False, record)


def find_promoted(storage_root: str, config_digest: str, storage_options: dict[str, Any] | None = None) -> PromotedCheckpoint | None:
    """Return the newest complete promoted checkpoint whose metadata has `config_digest`, else None."""
    matches: list[CheckpointEntry] = []
    for entry in find_checkpoints(storage.join(storage_root, "promoted"), storage_options, max_depth=1):
        if not entry.complete:
            continue
        record = entry.manifest.extra.get("promoted") or {}
        if record.get("config_digest") == config_digest:
            matches.append(entry)
    if not matches:
        return None
    newest = max(matches, key=lambda entry: entry.manifest.created_unix)
    record = newest.manifest.extra["promoted"]
    return PromotedCheckpoint(newest.uri, record["digest"], True, record)


def verify_checkpoint(entry: CheckpointEntry, storage_options: dict[str, Any] | None = None) -> None:
    """Raise PromotionError unless `entry` is committed, sized right and every checksum matches."""
    if not entry.complete:
        raise PromotionError(f"{entry.uri} is not a complete checkpoint: {entry.status}")
    fs, path = storage.open_fs(entry.uri, storage_options)
    problems = check_checksums(fs, path, entry.manifest, sorted(entry.manifest.files))
    if problems:
        raise PromotionError(f"{entry.uri} is corrupt: {'; '.join(problems)}")


def promote_checkpoint(
    source: CheckpointEntry,
    storage_root: str,
    next_model_config: Any,
    metadata: dict[str, Any],
    *,
    heldout_loss: Callable[[dict[str, torch.Tensor]], float] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> PromotedCheckpoint:
    """Verify, load and validate `source`, then publish it (see the module docstring).

    `heldout_loss(ema_weights)`, when given, returns a loss that is recorded
    in the metadata and must be finite.
    """
    verify_checkpoint(source, storage_options)
    weights, resized = validate_weights(read_weights(source.uri, storage_options), next_model_config, source.uri)
    record = {
        **metadata,
        "steps": source.step,
        "tokens": int(source.manifest.extra.get("tokens_seen", 0)),
        "source_checkpoint": source.uri,
        "resized": resized,
    }
    if heldout_loss is not None:
        loss = float(heldout_loss(weights["ema"]))
        if loss != loss or loss in (float("inf"), float("-inf")):
            raise PromotionError(f"{source.uri}: the held-out loss is {loss}, not finite")
        record["heldout_loss"] = loss
        logger.info("held-out loss of %s: %.4f", source.uri, loss)
    return publish(storage_root, weights, record, step=source.step, storage_options=storage_options)

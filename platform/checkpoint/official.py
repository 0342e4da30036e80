"""Convert between the released BAGEL-7B-MoT layout and promoted checkpoints.

Import reads `ema.safetensors`, `llm_config.json` and `vit_config.json`
(`ae.safetensors`, the FLUX VAE, is not part of the trained weights: stage
configs point `model.vae_path` at it) and publishes the weights as both
`model` and `ema` of a promoted checkpoint, so an SFT stage can start from it
with `run.init_from`. Export writes a promoted checkpoint's EMA (or model)
weights back in the released layout, bf16 by default, for inference.
"""

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from bagel.platform.checkpoint.promote import PromotedCheckpoint, publish, read_weights, validate_weights
from bagel.platform.checkpoint import storage
from bagel.platform.checkpoint.manifest import read_manifest

logger = logging.getLogger(__name__)


def model_spec(config: Any, base_name: str) -> dict[str, Any]:
    """Return {"name", "overrides"}: the fields where `config` differs from the named base config."""
    from bagel.model.configs import get_model_config

    return {"name": base_name, "overrides": _differences(get_model_config(base_name), config)}


def model_config_from_spec(spec: dict[str, Any]) -> Any:
    from bagel.model.configs import apply_overrides, get_model_config

    return apply_overrides(get_model_config(spec["name"]), spec.get("overrides") or {})


def import_official(
    directory: str | Path, storage_root: str, *, model_name: str = "bagel-7b-mot", storage_options: dict[str, Any] | None = None
) -> PromotedCheckpoint:
    """Publish the weights of a released-layout directory as a promoted checkpoint (model = EMA = file)."""
    from bagel.model.bagel import Bagel
    from bagel.model.configs import get_model_config
    from bagel.model.weights import load_official, read_official_config

    directory = Path(directory)
    config = read_official_config(directory, base=get_model_config(model_name))
    with torch.device("meta"):
        model = Bagel(config)
    load_official(model, directory)
    weights = {key: tensor.detach() for key, tensor in model.state_dict().items()}
    spec = model_spec(config, model_name)
    validated, _ = validate_weights({"model": weights, "ema": weights}, config, str(directory))
    metadata = {
        "stage": "import",
        "source_checkpoint": str(directory.resolve()),
        "model": spec,
        "config_digest": "",
        "steps": 0,
        "tokens": 0,
    }
    return publish(storage_root, validated, metadata, storage_options=storage_options)


def export_official(
    uri: str,
    directory: str | Path,
    *,
    weights_name: str = "ema",
    dtype: torch.dtype = torch.bfloat16,
    model: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Path:
    """Write the `weights_name` weights of checkpoint `uri` as ema.safetensors + llm/vit configs in `directory`.

    The model config comes from the promoted metadata, or from `model`
    ({"name", "overrides"}) for a checkpoint without one.
    """
    from bagel.model.bagel import Bagel
    from bagel.model.weights import save_official

    fs, path = storage.open_fs(uri, storage_options)
    manifest = read_manifest(fs, path)
    if manifest is None:
        raise FileNotFoundError(f"{uri} has no MANIFEST: it is not a complete checkpoint")
    spec = model or (manifest.extra.get("promoted") or {}).get("model")
    if spec is None:
        raise ValueError(f"{uri} records no model config: pass the model name (and overrides) to export it")
    config = model_config_from_spec(spec)
    weights = read_weights(uri, storage_options)
    if weights_name not in weights:
        raise ValueError(f"{uri} has no {weights_name!r} weights: it contains {', '.join(sorted(weights))}")
    with torch.device("meta"):
        bagel = Bagel(config)
    bagel.load_state_dict(weights[weights_name], strict=True, assign=True)
    return save_official(bagel, directory, dtype=dtype)


def _differences(base: Any, config: Any) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for field in dataclasses.fields(base):
        old, new = getattr(base, field.name), getattr(config, field.name)
        if dataclasses.is_dataclass(old) and dataclasses.is_dataclass(new):
            nested = _differences(old, new) if type(old) is type(new) else dataclasses.asdict(new)
            if nested:
                result[field.name] = nested
        elif old != new:
            result[field.name] = list(new) if isinstance(new, tuple) else new
    return result

"""Read and write weights in the released BAGEL-7B-MoT layout.

A model directory holds:
- `ema.safetensors`: every parameter of `Bagel` under its module path
  (`language_model.model.layers.0.self_attn.q_proj_moe_gen.weight`, ...), bf16
  in the release; the VAE is not in it;
- `llm_config.json`: the Qwen2 config (HF key names);
- `vit_config.json`: the SigLIP vision config, whose num_hidden_layers counts
  the layer that BAGEL drops (27 for 26 layers built).

The two sin-cos tables (`vit_pos_embed.pos_embed`, `latent_pos_embed.pos_embed`)
are regenerated on load, whatever the file holds, because they are a pure
function of their shape and the stage's max_latent_size may differ from the
file's.
"""

import dataclasses
import json
import logging
from pathlib import Path

import torch
from torch import nn

from bagel.model.configs import BagelConfig, LLMConfig, ViTConfig, get_model_config

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "ema.safetensors"
LLM_CONFIG_FILE = "llm_config.json"
VIT_CONFIG_FILE = "vit_config.json"
REGENERATED_KEYS = ("vit_pos_embed.pos_embed", "latent_pos_embed.pos_embed")

# LLMConfig / ViTConfig fields stored in the JSON files under the same name.
_LLM_KEYS = (
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "rope_theta",
    "max_position_embeddings",
    "rms_norm_eps",
    "tie_word_embeddings",
)
_VIT_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_hidden_layers",
    "patch_size",
    "image_size",
    "num_channels",
    "layer_norm_eps",
    "hidden_act",
)


def llm_config_dict(config: LLMConfig) -> dict:
    """Return the `llm_config.json` content (HF Qwen2 keys) for `config`."""
    content = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu"}
    content.update({key: getattr(config, key) for key in _LLM_KEYS})
    content["torch_dtype"] = "bfloat16"
    return content


def vit_config_dict(config: ViTConfig) -> dict:
    """Return the `vit_config.json` content (HF SigLIP vision keys) for `config`."""
    content = {"model_type": "siglip_vision_model"}
    content.update({key: getattr(config, key) for key in _VIT_KEYS})
    return content


def read_official_config(directory: str | Path, base: BagelConfig | None = None) -> BagelConfig:
    """Build a BagelConfig from a directory's llm_config.json and vit_config.json.

    Fields the files do not hold (special tokens, latent sizes, loss weights)
    come from `base` (default: the bagel-7b-mot config). Unknown JSON keys are ignored.
    """
    directory = Path(directory)
    config = dataclasses.replace(base) if base is not None else get_model_config("bagel-7b-mot")
    llm_json = _read_json(directory / LLM_CONFIG_FILE)
    vit_json = _read_json(directory / VIT_CONFIG_FILE)
    llm_values = {key: llm_json[key] for key in _LLM_KEYS if key in llm_json}
    vit_values = {key: vit_json[key] for key in _VIT_KEYS if key in vit_json}
    # BAGEL always unties lm_head, whatever the Qwen config sets.
    llm_values["tie_word_embeddings"] = False
    config.llm = dataclasses.replace(config.llm, **llm_values)
    config.vit = dataclasses.replace(config.vit, **vit_values)
    config.validate()
    return config


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a BAGEL model directory needs {LLM_CONFIG_FILE} and {VIT_CONFIG_FILE}")
    with path.open() as handle:
        return json.load(handle)


def _check_config_matches(model_config: BagelConfig, directory: Path) -> None:
    """Raise ValueError when the directory's JSON configs disagree with the model's shapes."""
    problems = []
    for filename, section, keys in (
        (LLM_CONFIG_FILE, model_config.llm, _LLM_KEYS),
        (VIT_CONFIG_FILE, model_config.vit, _VIT_KEYS),
    ):
        content = _read_json(directory / filename)
        for key in keys:
            if key == "tie_word_embeddings" or key not in content:
                continue
            expected = getattr(section, key)
            if isinstance(expected, float):
                same = abs(float(content[key]) - expected) <= 1e-9 * max(1.0, abs(expected))
            else:
                same = content[key] == expected
            if not same:
                problems.append(f"{filename} {key}={content[key]!r}, model has {expected!r}")
    if problems:
        raise ValueError(f"{directory} does not match the model config: " + "; ".join(problems))


def load_official(model: nn.Module, directory: str | Path, check_config: bool = True) -> None:
    """Load `ema.safetensors` from `directory` into `model` strictly.

    Every model key must be in the file with the same shape, and the file must
    have no other key. Otherwise a ValueError lists each missing key (with the
    expected shape), each unexpected key (with the found shape) and each shape
    mismatch.
    The sin-cos tables are regenerated (and logged). A model built on the
    meta device receives the file's tensors (cast to its parameter dtype). A
    model sharded with FSDP2/TP (DTensor parameters) receives each tensor
    distributed with the parameter's own placements.
    """
    from safetensors import safe_open

    directory = Path(directory)
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: point at a directory with {WEIGHTS_FILE}")
    if check_config:
        _check_config_matches(model.config, directory)

    expected = {key: tensor for key, tensor in model.state_dict().items()}
    with safe_open(str(path), framework="pt") as handle:
        file_keys = set(handle.keys())
        problems = []
        for key in sorted(set(expected) - file_keys):
            if key not in REGENERATED_KEYS:
                problems.append(f"missing key {key} (expected shape {tuple(expected[key].shape)})")
        for key in sorted(file_keys - set(expected)):
            problems.append(f"unexpected key {key} (found shape {tuple(handle.get_slice(key).get_shape())})")
        for key in sorted(file_keys & set(expected)):
            found = tuple(handle.get_slice(key).get_shape())
            want = tuple(expected[key].shape)
            if found != want and key not in REGENERATED_KEYS:
                problems.append(f"key {key}: expected shape {want}, found {found}")
        if problems:
            listed = "\n  ".join(problems[:20])
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise ValueError(f"{path} does not fit the model ({len(problems)} problems):\n  {listed}{more}")

        state = {}
        for key, target in expected.items():
            if key in REGENERATED_KEYS:
                continue
            state[key] = _like(handle.get_tensor(key), target)

    for key in REGENERATED_KEYS:
        if key in file_keys:
            logger.info("%s: ignoring the stored %s and regenerating it", path, key)
        target = expected[key]
        state[key] = torch.empty_like(target, device="cpu") if target.is_meta else target
    on_meta = any(tensor.is_meta for tensor in expected.values())
    model.load_state_dict(state, strict=True, assign=on_meta)
    model.vit_pos_embed.reset_parameters()
    model.latent_pos_embed.reset_parameters()
    logger.info("loaded %d tensors from %s; regenerated %s", len(state), path, ", ".join(REGENERATED_KEYS))


def _like(tensor: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cast a full tensor from the file to `target`'s dtype, device and, for a DTensor, its sharding."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(target, DTensor):
        tensor = tensor.to(device=target.device, dtype=target.dtype)
        return distribute_tensor(tensor, target.device_mesh, target.placements)
    device = "cpu" if target.is_meta else target.device
    return tensor.to(device=device, dtype=target.dtype)


def save_official(model: nn.Module, directory: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write `model` as ema.safetensors (cast to `dtype`) plus llm_config.json and vit_config.json; return the directory."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {key: tensor.detach().to("cpu", dtype).contiguous() for key, tensor in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    config: BagelConfig = model.config
    (directory / LLM_CONFIG_FILE).write_text(json.dumps(llm_config_dict(config.llm), indent=2) + "\n")
    (directory / VIT_CONFIG_FILE).write_text(json.dumps(vit_config_dict(config.vit), indent=2) + "\n")
    logger.info("saved %d tensors (%s) to %s", len(state), dtype, directory)
    return directory

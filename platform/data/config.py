"""The `data:` section of a stage config.

Plain dataclasses; `DataConfig.from_dict` builds one from the omegaconf/YAML
mapping at the edge. Example (tiny pretraining on the demo data):

    data:
      tokenizer: byte
      seed: 0
      num_workers: 2
      datasets:
        - {name: t2i, uri: file:///data/demo/t2i/manifest.json, weight: 2.0}
        - {name: vlm, uri: file:///data/demo/vlm/manifest.json, weight: 1.0, mandatory: true}
      packing: {expected_tokens: 384, max_tokens: 512, max_tokens_per_sample: 384}
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ImageTransformConfig:
    """Resize rules for the images of one role, applied before they enter the model.

    Resize keeps the aspect ratio so the long side is <= max_side and the short
    side >= min_side (min_side wins), caps H * W at max_pixels divided by the
    number of images in the sample, then rounds each side to a multiple of
    stride (at least one stride). The model's own limit (ViT patches per side,
    latent grid size) is applied on top, so a side never exceeds what the
    position tables cover.
    """

    min_side: int = 0  # px; 0 = no lower bound
    max_side: int = 0  # px; 0 = the model's limit
    stride: int = 0  # px; 0 = the model's (ViT patch size, or VAE downsample x latent patch)
    max_pixels: int = 0  # px per sample, shared by its images; 0 = no cap


@dataclass
class DatasetConfig:
    """One dataset of the mixture: a manifest written by `bagel data prepare` or `bagel data demo`."""

    name: str  # unique within the mixture; appears in sample ids, metrics and errors
    uri: str  # manifest URI: file://, s3://, memory:// or a local path
    weight: float = 1.0  # relative sampling weight among the draws after mandatory ones
    mandatory: bool = False  # every pack contains at least one sample of it (when it fits)
    vae_transform: ImageTransformConfig = field(default_factory=ImageTransformConfig)
    vit_transform: ImageTransformConfig = field(default_factory=ImageTransformConfig)


@dataclass
class PackingConfig:
    """Token budget of one packed sequence (tokens = text + ViT patches + VAE latents)."""

    expected_tokens: int = 384  # a pack is closed once it contains at least this many
    max_tokens: int = 512  # a pack never contains more
    max_tokens_per_sample: int = 384  # longer samples are skipped as "too_long"; <= max_tokens


@dataclass
class RetryConfig:
    """Retries of storage reads that fail with throttling, 5xx or connection errors."""

    max_attempts: int = 8  # attempts per read, first one included
    initial_backoff_s: float = 0.05  # first wait; doubles per attempt, full jitter
    max_backoff_s: float = 5.0  # cap on one wait
    budget_s: float = 120.0  # total time one read may spend retrying; then it fails


@dataclass
class DataConfig:
    """Everything the data pipeline of one training stage needs."""

    datasets: list[DatasetConfig] = field(default_factory=list)
    tokenizer: str = "byte"  # "byte", "qwen-offline", or a directory with tokenizer.json
    packing: PackingConfig = field(default_factory=PackingConfig)
    num_workers: int = 2  # DataLoader worker processes per rank; 0 = read in the trainer process
    prefetch_factor: int = 2  # packs prepared ahead per worker
    shuffle_buffer: int = 64  # samples per shuffle window (bounded memory); 1 = no sample shuffle
    seed: int = 0  # drives shard order, sample order, mixture draws, CFG dropout and noise
    skip_threshold: float = 0.01  # stop when more than this fraction of a dataset's samples is bad
    skip_min_samples: int = 200  # the threshold applies once a dataset has seen this many samples
    read_ahead_bytes: int = 8 * 2**20  # bytes fetched per storage request while streaming a shard
    read_ahead_blocks: int = 2  # requests of read_ahead_bytes in flight ahead of the parser (memory: blocks + 1)
    retry: RetryConfig = field(default_factory=RetryConfig)
    # Start the stream afresh instead of loading a checkpoint's data position
    # (needed after a change of data-parallel size or workers; samples repeat).
    ignore_saved_state: bool = False
    storage_options: dict[str, Any] = field(default_factory=dict)  # extra fsspec arguments (s3: key, secret, client_kwargs)

    def validate(self) -> None:
        """Check the section on its own (the loader also checks it against the model); raises ValueError."""
        if not self.datasets:
            raise ValueError("data.datasets is empty: list at least one dataset manifest URI")
        names = [d.name for d in self.datasets]
        if len(set(names)) != len(names) or not all(names):
            raise ValueError(f"data.datasets names must be unique and non-empty, got {names}")
        for d in self.datasets:
            if not d.uri:
                raise ValueError(f"data.datasets[{d.name}].uri is empty: give the manifest URI")
            if d.weight < 0:
                raise ValueError(f"data.datasets[{d.name}].weight={d.weight} is invalid: use a weight >= 0")
        if not any(d.weight > 0 for d in self.datasets):
            raise ValueError("data.datasets: at least one dataset needs weight > 0")
        p = self.packing
        if not 0 < p.max_tokens_per_sample <= p.max_tokens or not 0 < p.expected_tokens <= p.max_tokens:
            raise ValueError(
                f"data.packing needs 0 < max_tokens_per_sample <= max_tokens and 0 < expected_tokens <= max_tokens, got {p}"
            )
        if self.num_workers < 0 or self.shuffle_buffer < 1 or self.prefetch_factor < 1:
            raise ValueError(
                f"data.num_workers={self.num_workers}, shuffle_buffer={self.shuffle_buffer}, "
                f"prefetch_factor={self.prefetch_factor}: use num_workers >= 0 and the others >= 1"
            )
        if not 0 <= self.skip_threshold <= 1:
            raise ValueError(f"data.skip_threshold={self.skip_threshold} is invalid: use a fraction in [0, 1]")
        if self.read_ahead_blocks < 1 or self.read_ahead_bytes < 4096:
            raise ValueError(
                f"data.read_ahead_blocks={self.read_ahead_blocks}, read_ahead_bytes={self.read_ahead_bytes}: "
                "use at least 1 block of at least 4096 bytes"
            )

    @classmethod
    def from_dict(cls, raw: Any) -> "DataConfig":
        """Build from a plain mapping (an omegaconf container or parsed YAML); unknown keys fail."""
        if isinstance(raw, DataConfig):
            return raw
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(raw, DictConfig):
                raw = OmegaConf.to_container(raw, resolve=True)
        except ImportError:  # omegaconf is a dependency; this keeps the module importable alone
            pass
        return _build(cls, dict(raw or {}), "data")


def _build(cls: type, raw: dict, where: str) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known keys are {sorted(known)}")
    kwargs = {}
    for name, value in raw.items():
        sub = {
            "datasets": DatasetConfig,
            "packing": PackingConfig,
            "retry": RetryConfig,
            "vae_transform": ImageTransformConfig,
            "vit_transform": ImageTransformConfig,
        }.get(name)
        if name == "datasets":
            value = [_build(DatasetConfig, dict(v), f"{where}.datasets[{i}]") for i, v in enumerate(value or [])]
        elif sub is not None and isinstance(value, dict):
            value = _build(sub, value, f"{where}.{name}")
        kwargs[name] = value
    return cls(**kwargs)

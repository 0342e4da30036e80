"""The run configuration of `bagel train`: one YAML file per stage and model size, plus overrides.

A config names a packaged file (`tiny/pretrain` is `platform/configs/tiny/pretrain.yaml`)
or a YAML path; `key=value` overrides use omegaconf's dotlist syntax
(`optim.lr=3e-4 parallel.tp=2`). omegaconf is used only here, at the edge:
the merged mapping becomes typed dataclasses, and every unknown key, wrong
type or invalid value raises `ConfigError` naming the field
(`optim.lr`) and what to write instead.

The `data` and `checkpoint` sections are the data pipeline's `DataConfig` and
the checkpointer's `CheckpointConfig`; `job` is free-form here (the
Kubernetes launcher validates it).
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import logging
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bagel.platform.exit_codes import UsageError
from bagel.platform.layout import STAGES, StageLayout

logger = logging.getLogger(__name__)

CONFIG_ROOT = Path(__file__).parent / "configs"
MODEL_SIZES = ("tiny", "small", "bagel-7b-mot")


class ConfigError(UsageError):
    """An invalid run configuration; the message names the field and the fix."""


@dataclass
class ModelSection:
    """The BAGEL model to build."""

    name: str = "tiny"
    """A name known to `bagel.model.configs.get_model_config`: tiny, small or bagel-7b-mot."""

    overrides: dict[str, Any] = field(default_factory=dict)
    """Nested values replacing fields of the named `BagelConfig`, e.g. {timestep_shift: 4.0, llm: {num_hidden_layers: 4}}."""

    vae_path: str = ""
    """Local path of the FLUX `ae.safetensors`; "" builds a randomly initialised VAE (tests, smoke runs)."""


@dataclass
class ParallelConfig:
    """Parallel degrees; their product must equal the world size."""

    dp_replicate: int = 1
    """Data-parallel replicas (the HSDP replicate dimension): each keeps a full sharded copy."""

    dp_shard: int = -1
    """FSDP shard degree; -1 fills the world size left over by the other degrees."""

    tp: int = 1
    """Tensor-parallel degree; attention heads, KV heads and MLP widths must divide by it."""

    cp: int = 1
    """Context-parallel degree: each pack is split into `cp` contiguous chunks of the sequence."""

    reshard_after_forward: str = "default"
    """FSDP2 policy: "default", "always" or "never" (torchtitan's fsdp_reshard_after_forward)."""

    def validate(self) -> None:
        for name in ("dp_replicate", "tp", "cp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name}={getattr(self, name)} is invalid: use an integer >= 1")
        if self.dp_shard == 0 or self.dp_shard < -1:
            raise ConfigError(f"parallel.dp_shard={self.dp_shard} is invalid: use -1 (fill) or an integer >= 1")
        _check_choice("parallel.reshard_after_forward", self.reshard_after_forward, ("default", "always", "never"))

    def resolve(self, world_size: int) -> "ParallelConfig":
        """Return a copy with dp_shard filled in, after checking the product against `world_size`."""
        others = self.dp_replicate * self.tp * self.cp
        dp_shard = self.dp_shard
        if dp_shard == -1:
            if world_size % others:
                raise ConfigError(
                    f"world size {world_size} does not divide by parallel.dp_replicate * tp * cp = "
                    f"{self.dp_replicate} * {self.tp} * {self.cp} = {others}: change the degrees or the number of processes"
                )
            dp_shard = world_size // others
        if dp_shard * others != world_size:
            raise ConfigError(
                f"parallel degrees dp_replicate={self.dp_replicate} * dp_shard={dp_shard} * tp={self.tp} * cp={self.cp} "
                f"= {dp_shard * others} != world size {world_size}: set parallel.dp_shard=-1 or fix the degrees"
            )
        return dataclasses.replace(self, dp_shard=dp_shard)


@dataclass
class OptimConfig:
    """AdamW settings (BAGEL uses beta 0.9/0.95, eps 1e-15, no weight decay in every stage)."""

    lr: float = 1e-4
    """Peak learning rate."""

    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """Adam beta1 and beta2."""

    eps: float = 1e-15
    """Adam epsilon; BAGEL's tiny value guards against loss spikes."""

    weight_decay: float = 0.0
    """Decoupled weight decay."""

    max_grad_norm: float = 1.0
    """Clip the global gradient L2 norm (over every mesh) to this value; 0 disables clipping."""

    implementation: str = "foreach"
    """torch.optim implementation: "foreach", "fused" (CUDA only) or "for-loop"."""

    def validate(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"optim.lr={self.lr} is invalid: use a positive learning rate")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas={self.betas} is invalid: use two values in [0, 1), e.g. [0.9, 0.95]")
        if self.eps <= 0 or self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ConfigError(
                f"optim.eps={self.eps}, weight_decay={self.weight_decay}, max_grad_norm={self.max_grad_norm}: "
                "eps must be > 0, the others >= 0"
            )
        _check_choice("optim.implementation", self.implementation, ("foreach", "fused", "for-loop"))


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: linear warm-up, then constant or cosine decay."""

    kind: str = "constant"
    """ "constant" or "cosine"."""

    warmup_steps: int = 0
    """Steps of linear warm-up from lr/warmup_steps to lr."""

    min_lr_factor: float = 0.0
    """Cosine only: the final learning rate as a fraction of optim.lr."""

    total_steps: int | None = None
    """Steps the schedule spans; None uses train.steps."""

    def validate(self) -> None:
        _check_choice("schedule.kind", self.kind, ("constant", "cosine"))
        if self.warmup_steps < 0:
            raise ConfigError(f"schedule.warmup_steps={self.warmup_steps} is invalid: use an integer >= 0")
        if not 0 <= self.min_lr_factor <= 1:
            raise ConfigError(f"schedule.min_lr_factor={self.min_lr_factor} is invalid: use a value in [0, 1]")


@dataclass
class SpikeConfig:
    """The response to a non-finite loss or one far above its recent average."""

    policy: str = "skip"
    """ "skip" (drop the update, keep training), "stop" (exit with an error) or "off"."""

    factor: float = 3.0
    """A step is a spike when its loss exceeds `factor` times the running mean of recent losses."""

    warmup_steps: int = 20
    """Steps that only feed the running mean before spikes are detected (early losses fall fast)."""

    ema_decay: float = 0.9
    """Decay of the running mean of accepted losses."""

    max_consecutive: int = 5
    """Stop after this many consecutive skipped steps: a run that keeps skipping is diverging."""

    def validate(self) -> None:
        _check_choice("train.spike.policy", self.policy, ("skip", "stop", "off"))
        if self.factor <= 1:
            raise ConfigError(f"train.spike.factor={self.factor} is invalid: use a value > 1, e.g. 3.0")
        if not 0 < self.ema_decay < 1 or self.max_consecutive < 1 or self.warmup_steps < 0:
            raise ConfigError(
                f"train.spike: ema_decay={self.ema_decay} must lie in (0, 1), max_consecutive={self.max_consecutive} "
                f"must be >= 1 and warmup_steps={self.warmup_steps} >= 0"
            )


@dataclass
class TrainConfig:
    """The training loop."""

    steps: int = 10
    """Optimizer steps of this stage."""

    grad_accum: int = 1
    """Micro-batches (packs) per optimizer step on each data-parallel rank."""

    seed: int = 4396
    """Seed of parameter initialisation; the same on every rank so shards agree."""

    dtype: str = "auto"
    """Compute dtype: "auto" (bf16 on CUDA, fp32 on CPU), "bf16" or "fp32". Master weights stay fp32."""

    activation_checkpointing: str = "none"
    """ "none", "selective" (torchtitan's per-op policy) or "full" (recompute each decoder layer)."""

    compile: bool = False
    """torch.compile each decoder layer (CUDA only; ignored with a warning on CPU)."""

    ema: float = 0.0
    """Decay of the fp32 EMA of the trainable weights per step; 0 keeps no EMA."""

    trainable: list[str] = field(default_factory=lambda: [".*"])
    """Regexes (re.match on parameter names) of the parameters to train; the rest stay frozen."""

    frozen: list[str] = field(default_factory=list)
    """Regexes of parameters to freeze even when `trainable` matches them."""

    spike: SpikeConfig = field(default_factory=SpikeConfig)
    """Loss-spike and NaN policy."""

    def validate(self) -> None:
        if self.steps < 1 or self.grad_accum < 1:
            raise ConfigError(f"train.steps={self.steps} and train.grad_accum={self.grad_accum} must be >= 1")
        _check_choice("train.dtype", self.dtype, ("auto", "bf16", "fp32"))
        _check_choice("train.activation_checkpointing", self.activation_checkpointing, ("none", "selective", "full"))
        if not 0 <= self.ema < 1:
            raise ConfigError(f"train.ema={self.ema} is invalid: use a decay in [0, 1), e.g. 0.9999, or 0 for none")
        for pattern in [*self.trainable, *self.frozen]:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ConfigError(f"invalid regex {pattern!r} in train.trainable/frozen: {error}") from None
        self.spike.validate()


@dataclass
class MetricsConfig:
    """Logging, TensorBoard and GPU-health metrics."""

    log_every: int = 10
    """Steps between progress lines (rank 0) and TensorBoard scalars."""

    tensorboard: bool = True
    """Write TensorBoard event files (rank 0) and sync them to the run's storage."""

    sync_every_s: float = 60.0
    """Seconds between background syncs of the event files to storage."""

    local_dir: str = ""
    """Local directory for event files before they are synced; "" uses a temporary directory."""

    gpu_health: bool = True
    """Collect NVML GPU metrics (utilisation, power, clocks, throttling, ECC), reduced across ranks."""

    peak_tflops: float = 0.0
    """Peak dense bf16 TFLOP/s of one accelerator for MFU; 0 looks the GPU name up in a table."""

    goodput_heartbeat_s: float = 30.0
    """Seconds between writes of the goodput ledger (rank 0). After a SIGKILL, the work lost since the
    last checkpoint is under-counted by up to this much; 0 writes it after every step."""

    def validate(self) -> None:
        if self.log_every < 1 or self.sync_every_s <= 0 or self.peak_tflops < 0 or self.goodput_heartbeat_s < 0:
            raise ConfigError(
                f"metrics.log_every={self.log_every} must be >= 1, sync_every_s={self.sync_every_s} > 0, "
                f"peak_tflops={self.peak_tflops} >= 0 and goodput_heartbeat_s={self.goodput_heartbeat_s} >= 0"
            )


@dataclass
class RunSection:
    """Identity of the run and where it keeps its files."""

    name: str = "dev"
    """Run name (a DNS-1123 label): names the storage folder and the Kubernetes objects."""

    stage: str = "pretrain"
    """alignment, pretrain, continued or sft."""

    storage: str = "file:///tmp/bagel"
    """URI root (file:// or s3://) of checkpoints, event files and summaries."""

    init_from: str = ""
    """URI of a promoted checkpoint to start from when the run has none of its own; "" starts fresh."""

    def validate(self) -> None:
        try:
            StageLayout(self.storage, self.name, self.stage)
        except ValueError as error:
            raise ConfigError(f"run: {error}") from None
        if "://" not in self.storage:
            raise ConfigError(f"run.storage={self.storage!r} is invalid: use a URI such as file:///data/bagel or s3://bucket/bagel")

    @property
    def layout(self) -> StageLayout:
        return StageLayout(self.storage, self.name, self.stage)


@dataclass
class RunConfig:
    """The root of a stage config."""

    model: ModelSection = field(default_factory=ModelSection)
    data: Any = None
    """bagel.platform.data.config.DataConfig."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: Any = None
    """bagel.platform.checkpoint.CheckpointConfig."""
    preemption: Any = None
    """bagel.platform.preemption.PreemptionConfig (SIGTERM deadline)."""
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    run: RunSection = field(default_factory=RunSection)
    job: dict[str, Any] = field(default_factory=dict)
    """Free-form launch settings (nodes, gpus_per_node, image, ...), validated by the launcher."""

    def validate(self) -> None:
        """Check every section; world-size checks happen at start-up (`ParallelConfig.resolve`)."""
        if self.model.name not in MODEL_SIZES:
            raise ConfigError(f"model.name={self.model.name!r} is unknown: use one of {', '.join(MODEL_SIZES)}")
        for section in (self.parallel, self.optim, self.schedule, self.train, self.metrics, self.run):
            section.validate()
        for name in ("data", "checkpoint", "preemption"):
            validate = getattr(getattr(self, name), "validate", None)
            if validate is not None:
                try:
                    validate()
                except ConfigError:
                    raise
                except (ValueError, TypeError) as error:
                    raise ConfigError(f"{name}: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        """Return the config as plain YAML-able values (the resolved config that digests cover)."""
        return _to_plain(self)


# Sections owned by other components, built from their own dataclasses when importable.
_EXTERNAL_SECTIONS = {
    "data": ("bagel.platform.data.config", "DataConfig"),
    "checkpoint": ("bagel.platform.checkpoint", "CheckpointConfig"),
    "preemption": ("bagel.platform.preemption", "PreemptionConfig"),
}


def config_path(name_or_path: str) -> Path:
    """Return the YAML file of a packaged config name (`tiny/pretrain`) or of a path."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml"):
        if not candidate.is_file():
            raise ConfigError(f"config file {name_or_path} not found")
        return candidate
    packaged = CONFIG_ROOT / f"{name_or_path}.yaml"
    if not packaged.is_file():
        known = sorted(str(p.relative_to(CONFIG_ROOT).with_suffix("")) for p in CONFIG_ROOT.glob("*/*.yaml"))
        raise ConfigError(f"unknown config {name_or_path!r}: use a YAML path or one of {', '.join(known)}")
    return packaged


def load_config_dict(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Return the merged mapping of a config file and its dotlist overrides, interpolations resolved."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = config_path(name_or_path)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"invalid override {item!r}: write KEY=VALUE, e.g. optim.lr=3e-4")
    try:
        merged = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(list(overrides)))
        plain = OmegaConf.to_container(merged, resolve=True)
    except (OmegaConfBaseException, ValueError) as error:
        raise ConfigError(f"cannot read config {path}: {error}") from None
    if not isinstance(plain, dict):
        raise ConfigError(f"config {path} must be a mapping of sections, got {type(plain).__name__}")
    return plain


def load_run_config(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load, override, type-check and validate a stage config."""
    config = build_run_config(load_config_dict(name_or_path, overrides))
    config.validate()
    return config


def build_run_config(mapping: dict[str, Any]) -> RunConfig:
    """Build a `RunConfig` from a plain mapping (unvalidated); the sections data/checkpoint use their owners' classes."""
    mapping = dict(mapping)
    external: dict[str, Any] = {}
    for name, (module_name, class_name) in _EXTERNAL_SECTIONS.items():
        raw = mapping.pop(name, None) or {}
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except ModuleNotFoundError as error:
            if error.name is None or not module_name.startswith(error.name):
                raise
            logger.warning("%s is not available, so the %s section stays an unchecked mapping", module_name, name)
            external[name] = raw
            continue
        if hasattr(cls, "from_dict"):
            try:
                external[name] = cls.from_dict(raw)
            except (ValueError, TypeError) as error:
                raise ConfigError(f"invalid {name} section: {error}") from None
        else:
            external[name] = build_dataclass(cls, raw, name)
    config = build_dataclass(RunConfig, mapping, "")
    for name, value in external.items():
        setattr(config, name, value)
    return config


def _check_choice(field_name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{field_name}={value!r} is invalid: use one of {', '.join(repr(c) for c in choices)}")


def build_dataclass(cls: type, mapping: Any, path: str) -> Any:
    """Build dataclass `cls` from a plain `mapping`, type-checking every field and recursing into nested dataclasses.

    `path` is the section's dotted name (`job`, `preemption`), so errors name
    the field (`job.nodes`). Unknown keys, wrong types and values the class
    rejects raise ConfigError. Other components use it for the config sections they own.
    """
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, dict):
        raise ConfigError(f"{path or 'config'} must be a mapping, got {mapping!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(mapping) - set(known))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(
            f"unknown key {where}{unknown[0]} in {cls.__name__}: valid keys are {', '.join(sorted(known))}"
        )
    values = {}
    for name, value in mapping.items():
        field_path = f"{path}.{name}" if path else name
        if value is None and hints[name] is str:
            # An override such as `job.image=` parses to None; the message shows what to write instead.
            raise ConfigError(_missing_string_message(field_path, known[name].default))
        values[name] = _convert(hints[name], value, field_path)
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"invalid {path or 'config'}: {error}") from None


def _missing_string_message(path: str, default: Any) -> str:
    """Return the error for a string field given no value, with an example of what to write."""
    if isinstance(default, str) and default:
        return f"{path} has no value: write a string, e.g. {path}={default}"
    if default == "":
        return f"{path} has no value: write a string, or {path}='' to leave it empty"
    return f"{path} has no value: write a string, e.g. {path}=VALUE"


def _convert(hint: Any, value: Any, path: str) -> Any:
    """Check `value` against type hint `hint` (recursing into dataclasses, lists and dicts)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, path)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}={value!r} matches none of {hint}")
    if origin is typing.Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{path}={value!r} is invalid: use one of {typing.get_args(hint)}")
        return value
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}={value!r} is invalid: expected a list")
        args = typing.get_args(hint)
        item_hint = args[0] if args else Any
        items = [_convert(item_hint, item, f"{path}[{i}]") for i, item in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}={value!r} is invalid: expected a mapping")
        args = typing.get_args(hint)
        value_hint = args[1] if len(args) == 2 else Any
        return {key: _convert(value_hint, item, f"{path}.{key}") for key, item in value.items()}
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}={value!r} is invalid: expected a number")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}={value!r} is invalid: expected an integer")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}={value!r} is invalid: expected true or false")
        return value
    if hint is str:
        if value is None:
            raise ConfigError(_missing_string_message(path, None))
        if not isinstance(value, str):
            raise ConfigError(f"{path}={value!r} is invalid: expected a string")
        return value
    return value


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_to_plain(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _to_plain(item) for key, item in value.items()}
    if isinstance(value, enum.Enum):
        return value.value
    return value


__all__ = [
    "ConfigError",
    "MetricsConfig",
    "ModelSection",
    "OptimConfig",
    "ParallelConfig",
    "RunConfig",
    "RunSection",
    "ScheduleConfig",
    "SpikeConfig",
    "STAGES",
    "TrainConfig",
    "build_dataclass",
    "build_run_config",
    "load_config_dict",
    "load_run_config",
]

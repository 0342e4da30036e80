"""Stage configs: every packaged YAML loads, overrides apply, invalid values name their field."""

from pathlib import Path

import pytest

from bagel.platform.config import CONFIG_ROOT, ConfigError, ParallelConfig, load_run_config
from bagel.platform.layout import STAGES

PACKAGED = sorted(str(p.relative_to(CONFIG_ROOT).with_suffix("")) for p in CONFIG_ROOT.glob("*/*.yaml"))


def test_every_stage_and_size_has_a_config() -> None:
    for size in ("tiny", "small", "bagel-7b-mot"):
        for stage in STAGES:
            assert f"{size}/{stage}" in PACKAGED


@pytest.mark.parametrize("name", PACKAGED)
def test_packaged_config_loads(name: str) -> None:
    config = load_run_config(name)
    assert config.run.stage == name.split("/")[1]
    assert config.model.name == name.split("/")[0]
    assert config.optim.betas == [0.9, 0.95]
    assert config.optim.eps == 1e-15


def test_stage_hyper_parameters() -> None:
    alignment = load_run_config("bagel-7b-mot/alignment")
    assert (alignment.optim.lr, alignment.schedule.kind, alignment.schedule.warmup_steps) == (1e-3, "cosine", 250)
    assert alignment.train.trainable == ["connector\\."]
    sft = load_run_config("bagel-7b-mot/sft")
    assert (sft.optim.lr, sft.train.ema, sft.train.steps) == (2.5e-5, 0.995, 15000)
    continued = load_run_config("bagel-7b-mot/continued")
    assert continued.model.overrides["timestep_shift"] == 4.0


def test_dotlist_overrides() -> None:
    config = load_run_config("tiny/pretrain", ["optim.lr=3e-4", "parallel.tp=2", "run.name=exp-1"])
    assert config.optim.lr == 3e-4
    assert config.parallel.tp == 2
    assert config.run.name == "exp-1"


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("optim.lrr=1", "optim.lrr"),
        ("optim.lr=fast", "optim.lr"),
        ("optim.lr=-1", "optim.lr"),
        ("train.activation_checkpointing=some", "train.activation_checkpointing"),
        ("schedule.kind=linear", "schedule.kind"),
        ("parallel.tp=0", "parallel.tp"),
        ("run.name=Bad_Name", "run"),
        ("run.stage=warmup", "stage"),
        ("train.spike.policy=ignore", "train.spike.policy"),
        ("checkpoint.interval_steps=-1", "checkpoint.interval_steps"),
    ],
)
def test_invalid_value_names_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_run_config("tiny/pretrain", [override])
    assert field in str(error.value)


def test_unknown_config_lists_packaged_names() -> None:
    with pytest.raises(ConfigError, match="tiny/pretrain"):
        load_run_config("tiny/nonexistent")


def test_yaml_path(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text((CONFIG_ROOT / "tiny" / "sft.yaml").read_text())
    assert load_run_config(str(path)).run.stage == "sft"


def test_parallel_product_checked() -> None:
    assert ParallelConfig(tp=2, cp=2).resolve(8).dp_shard == 2
    with pytest.raises(ConfigError, match="world size 6"):
        ParallelConfig(tp=4).resolve(6)
    with pytest.raises(ConfigError, match="dp_shard=2"):
        ParallelConfig(dp_shard=2, tp=2).resolve(8)


def test_tp_must_divide_heads() -> None:
    from bagel.model.configs import get_model_config
    from bagel.platform.train.parallelize import validate_parallel_shapes

    tiny = get_model_config("tiny")
    with pytest.raises(ConfigError, match="num_key_value_heads=2"):
        validate_parallel_shapes(tiny, ParallelConfig(tp=4, dp_shard=1), None)
    with pytest.raises(ConfigError, match="max_tokens=511"):
        validate_parallel_shapes(tiny, ParallelConfig(cp=2, dp_shard=1), 511)

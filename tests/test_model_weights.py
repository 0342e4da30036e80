"""Weight I/O in the released layout (ema.safetensors, llm_config.json, vit_config.json), on the tiny model."""

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from bagel.model.bagel import build_model
from bagel.model.configs import get_model_config
from bagel.model.weights import load_official, read_official_config, save_official


@pytest.fixture
def config():
    return get_model_config("tiny")


@pytest.fixture
def saved(tmp_path, config):
    model = build_model(config, seed=3)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.01)  # make every tensor distinct from a fresh init
    directory = save_official(model, tmp_path / "tiny-mot", dtype=torch.bfloat16)
    return model, directory


def test_round_trip_bf16(saved, config):
    model, directory = saved
    assert sorted(p.name for p in directory.iterdir()) == ["ema.safetensors", "llm_config.json", "vit_config.json"]
    stored = load_file(str(directory / "ema.safetensors"))
    assert set(stored) == set(model.state_dict())
    assert all(tensor.dtype == torch.bfloat16 for tensor in stored.values())

    restored = build_model(config, seed=99)
    load_official(restored, directory)
    for key, tensor in restored.state_dict().items():
        if key.endswith("pos_embed"):
            continue
        torch.testing.assert_close(tensor, stored[key].float(), msg=key)


def test_round_trip_into_meta_model(saved, config):
    _, directory = saved
    restored = build_model(config, device="meta")
    load_official(restored, directory)
    assert not any(p.is_meta for p in restored.parameters())
    fresh = build_model(config, seed=0)
    torch.testing.assert_close(restored.latent_pos_embed.pos_embed, fresh.latent_pos_embed.pos_embed)


def test_sincos_tables_regenerated_and_logged(saved, config, caplog):
    model, directory = saved
    restored = build_model(config, seed=5)
    with caplog.at_level(logging.INFO, logger="bagel.model.weights"):
        load_official(restored, directory)
    assert "regenerating it" in caplog.text
    # The stored tables were perturbed before saving; the loaded ones are the exact sin-cos tables.
    fresh = build_model(config, seed=0)
    torch.testing.assert_close(restored.vit_pos_embed.pos_embed, fresh.vit_pos_embed.pos_embed)
    assert not torch.equal(restored.vit_pos_embed.pos_embed, model.vit_pos_embed.pos_embed)


def test_configs_written_in_released_keys(saved, config):
    _, directory = saved
    llm = json.loads((directory / "llm_config.json").read_text())
    vit = json.loads((directory / "vit_config.json").read_text())
    assert llm["num_key_value_heads"] == 2
    assert llm["rope_theta"] == 1e6
    assert llm["vocab_size"] == 512
    assert vit["num_hidden_layers"] == 3  # counts the layer BAGEL drops
    assert read_official_config(directory, base=config) == config


def _rewrite(directory, change):
    path = directory / "ema.safetensors"
    state = load_file(str(path))
    change(state)
    save_file(state, str(path))


def test_missing_key_named(saved, config):
    _, directory = saved
    _rewrite(directory, lambda state: state.pop("language_model.model.norm_moe_gen.weight"))
    with pytest.raises(ValueError, match=r"missing key language_model\.model\.norm_moe_gen\.weight \(expected shape \(64,\)\)"):
        load_official(build_model(config), directory)


def test_unexpected_key_named(saved, config):
    _, directory = saved
    _rewrite(directory, lambda state: state.__setitem__("extra.weight", torch.zeros(2, 3)))
    with pytest.raises(ValueError, match=r"unexpected key extra\.weight \(found shape \(2, 3\)\)"):
        load_official(build_model(config), directory)


def test_shape_mismatch_named(saved, config):
    _, directory = saved
    key = "language_model.model.layers.1.self_attn.k_proj_moe_gen.weight"
    _rewrite(directory, lambda state: state.__setitem__(key, torch.zeros(16, 64)))
    with pytest.raises(ValueError, match=rf"key {key.replace('.', '[.]')}: expected shape \(32, 64\), found \(16, 64\)"):
        load_official(build_model(config), directory)


def test_config_mismatch_rejected(saved, config):
    _, directory = saved
    path = directory / "llm_config.json"
    content = json.loads(path.read_text())
    content["intermediate_size"] = 128
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match="intermediate_size=128, model has 176"):
        load_official(build_model(config), directory)


def test_missing_directory_rejected(tmp_path, config):
    with pytest.raises(FileNotFoundError, match="ema.safetensors not found"):
        load_official(build_model(config), tmp_path)


def _fsdp_load_worker(rank: int, port: int, directory: str, result_path: str) -> None:
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from bagel.model.testing import random_pack

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=1)
    try:
        config = get_model_config("tiny")
        model = build_model(config, device="meta")
        mesh = init_device_mesh("cpu", (1,))
        for layer in model.language_model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        model.to_empty(device="cpu")
        model.init_weights()
        load_official(model, directory)
        packed = random_pack(config, seed=1, num_samples=2, kinds=["vlm", "text"])
        torch.save(model(packed, None).ce_sum.detach(), result_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_load_into_fsdp2_sharded_model(saved, config, tmp_path):
    """The trainer's order: build on meta, shard with FSDP2, materialise, then load the released layout."""
    import socket

    import torch.multiprocessing as mp

    from bagel.model.testing import random_pack

    _, directory = saved
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result_path = str(tmp_path / "ce.pt")
    mp.spawn(_fsdp_load_worker, args=(port, str(directory), result_path), nprocs=1, join=True)

    reference = build_model(config, seed=0)
    load_official(reference, directory)
    packed = random_pack(config, seed=1, num_samples=2, kinds=["vlm", "text"])
    torch.testing.assert_close(torch.load(result_path), reference(packed, None).ce_sum.detach())

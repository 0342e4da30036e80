"""Promotion, config digests, official-weight import/export and the `bagel ckpt` commands, on the tiny model.

Runs in one process against `file://` and the loopback SeaweedFS server.
"""

import contextlib
import io
import json
import logging
import subprocess
import sys

import pytest
import torch

from bagel.model.bagel import Bagel
from bagel.model.configs import apply_overrides, get_model_config
from bagel.model.weights import save_official
from bagel.platform.checkpoint.config import CheckpointConfig
from bagel.platform.checkpoint.digest import config_digest
from bagel.platform.checkpoint.listing import scan_checkpoints
from bagel.platform.checkpoint.manager import CheckpointManager
from bagel.platform.checkpoint.official import export_official, import_official
from bagel.platform.checkpoint.promote import PromotionError, find_promoted, publish, read_weights, validate_weights
from bagel.platform.checkpoint.states import ModelState, TrainProgress
from bagel.platform.cli import main as bagel_main
from bagel.platform.layout import StageLayout


@pytest.fixture(scope="module")
def tiny_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = Bagel(get_model_config("tiny"))
    model.init_weights()
    return {key: tensor.detach().clone() for key, tensor in model.state_dict().items()}


def test_rejects_nan_weight(tiny_weights):
    broken = dict(tiny_weights)
    broken["connector.fc2.weight"] = broken["connector.fc2.weight"].clone()
    broken["connector.fc2.weight"][0, 0] = float("nan")
    with pytest.raises(PromotionError, match=r"model weight connector\.fc2\.weight has 1 non-finite"):
        validate_weights({"model": broken}, get_model_config("tiny"), "stage checkpoint")


def test_rejects_nan_in_ema(tiny_weights):
    ema = dict(tiny_weights)
    ema["vae2llm.bias"] = torch.full_like(ema["vae2llm.bias"], float("inf"))
    with pytest.raises(PromotionError, match=r"ema weight vae2llm\.bias has \d+ non-finite"):
        validate_weights({"model": tiny_weights, "ema": ema}, get_model_config("tiny"), "stage checkpoint")


def test_rejects_missing_key(tiny_weights):
    broken = {key: value for key, value in tiny_weights.items() if key != "time_embedder.mlp.0.weight"}
    with pytest.raises(PromotionError, match=r"missing key time_embedder\.mlp\.0\.weight"):
        validate_weights({"model": broken}, get_model_config("tiny"), "stage checkpoint")


def test_rejects_shape_mismatch(tiny_weights):
    wider = apply_overrides(get_model_config("tiny"), {"llm": {"intermediate_size": 96}})
    with pytest.raises(PromotionError, match=r"shape mismatch for language_model\.model\.layers\.0\.mlp\.gate_proj\.weight"):
        validate_weights({"model": tiny_weights}, wider, "stage checkpoint")


def test_latent_grid_change_is_logged_resize(tiny_weights, caplog):
    bigger_grid = apply_overrides(get_model_config("tiny"), {"max_latent_size": 16})
    with caplog.at_level(logging.WARNING, logger="bagel.platform.checkpoint"):
        weights, resized = validate_weights({"model": tiny_weights}, bigger_grid, "stage checkpoint")
    assert weights["model"]["latent_pos_embed.pos_embed"].shape == (256, tiny_weights["latent_pos_embed.pos_embed"].shape[1])
    assert len(resized) == 1
    assert "latent_pos_embed.pos_embed: resized (64, 64) -> (256, 64)" in resized[0]
    assert "latent_pos_embed.pos_embed: resized" in caplog.text
    expected = Bagel(bigger_grid)
    expected.latent_pos_embed.reset_parameters()
    assert torch.equal(weights["model"]["latent_pos_embed.pos_embed"], expected.latent_pos_embed.pos_embed.detach())


def test_publish_is_content_addressed_and_reused(store, tiny_weights):
    root, options = store
    weights, _ = validate_weights({"model": tiny_weights}, get_model_config("tiny"), "test")
    first = publish(root, weights, {"stage": "pretrain", "config_digest": "c1"}, step=5, storage_options=options)
    again = publish(root, weights, {"stage": "pretrain", "config_digest": "c1"}, step=5, storage_options=options)
    assert (first.reused, again.reused) == (False, True)
    assert again.uri == first.uri
    assert first.uri.endswith(f"/promoted/{first.digest}")
    other = publish(root, weights, {"stage": "pretrain", "config_digest": "c2"}, step=5, storage_options=options)
    assert other.digest != first.digest

    loaded = read_weights(first.uri, options)
    assert all(torch.equal(loaded["ema"][key], weights["ema"][key]) for key in weights["ema"])
    assert find_promoted(root, "c1", options).uri == first.uri
    assert find_promoted(root, "missing", options) is None


def test_config_digest_inputs():
    config = {"optim": {"lr": 1e-4}, "run": {"name": "a", "storage": "s3://x", "init_from": "s3://x/promoted/d", "stage": "sft"}}
    base = config_digest(config, "d", {"m": "1"})
    renamed = {**config, "run": {**config["run"], "name": "b", "storage": "file:///y"}}
    assert config_digest(renamed, "d", {"m": "1"}) == base
    assert config_digest({**config, "optim": {"lr": 2e-4}}, "d", {"m": "1"}) != base
    assert config_digest(config, "other-start", {"m": "1"}) != base
    assert config_digest(config, "d", {"m": "2"}) != base
    with_secret = {**config, "checkpoint": {"storage_options": {"secret": "s"}}}
    assert config_digest(with_secret, "d", {"m": "1"}) == config_digest({**config, "checkpoint": {}}, "d", {"m": "1"})


def test_import_export_round_trip(store, tmp_path):
    root, options = store
    torch.manual_seed(1)
    model = Bagel(get_model_config("tiny"))
    model.init_weights()
    released = save_official(model, tmp_path / "released")
    (released / "ae.safetensors").write_bytes(b"")  # present in a release, not part of the trained weights

    promoted = import_official(released, root, model_name="tiny", storage_options=options)
    assert not promoted.reused
    assert promoted.metadata["model"] == {"name": "tiny", "overrides": {}}
    exported = export_official(promoted.uri, tmp_path / "exported", storage_options=options)

    from safetensors.torch import load_file

    before = load_file(str(released / "ema.safetensors"))
    after = load_file(str(exported / "ema.safetensors"))
    assert set(after) == set(before)
    for key in before:
        assert after[key].dtype == torch.bfloat16, key
        assert torch.equal(after[key], before[key]), key
    for name in ("llm_config.json", "vit_config.json"):
        assert json.loads((exported / name).read_text()) == json.loads((released / name).read_text())

    # The imported checkpoint starts a stage: model and EMA load through run.init_from.
    fresh = Bagel(get_model_config("tiny"))
    manager = CheckpointManager(CheckpointConfig(storage_options=options), StageLayout(root, "sft-run", "sft"), init_from=promoted.uri)
    info = manager.resume({"model": ModelState(fresh), "progress": TrainProgress()})
    assert info.source == "init_from"
    for key, tensor in fresh.state_dict().items():
        assert torch.equal(tensor.to(torch.bfloat16), before[key]), key


def run_cli(*args: str) -> tuple[int, str]:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = bagel_main(list(args))
    return code, stdout.getvalue()


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    subprocess.run([sys.executable, "-m", "bagel.platform", "data", "demo", str(root)], check=True, timeout=120)
    return root


def test_cli_promote_find_list(store, tiny_weights, demo_data, monkeypatch):
    root, options = store
    monkeypatch.setenv("BAGEL_DATA_ROOT", demo_data.as_uri())
    # A pretrain checkpoint as the trainer writes it (model, EMA, progress).
    model = Bagel(get_model_config("tiny"))
    model.load_state_dict(tiny_weights)
    progress = TrainProgress(step=4, tokens_seen=400)
    layout = StageLayout(root, "run1", "pretrain")
    manager = CheckpointManager(CheckpointConfig(storage_options=options), layout)
    manager.save(4, {"model": ModelState(model), "ema": ModelState(model), "progress": progress}, extra={"tokens_seen": 400})
    manager.close()

    code, before = run_cli("ckpt", "find-promoted", "--config", "tiny/pretrain", "--storage", root)
    assert (code, json.loads(before)) == (0, {})

    code, output = run_cli(
        "ckpt", "promote", "--config", "tiny/pretrain", "--run", "run1", "--storage", root,
        "--next-config", "tiny/sft", "--heldout-config", "tiny/sft", "--heldout-packs", "2",
    )
    assert code == 0
    assert len(output.splitlines()) == 1
    promoted = json.loads(output)
    assert promoted["reused"] is False
    assert promoted["uri"].endswith(promoted["digest"])

    code, found = run_cli("ckpt", "find-promoted", "--config", "tiny/pretrain", "--storage", root)
    assert code == 0
    assert json.loads(found)["uri"] == promoted["uri"]
    code, other = run_cli("ckpt", "find-promoted", "--config", "tiny/pretrain", "--storage", root, "optim.lr=0.002")
    assert json.loads(other) == {}

    code, again = run_cli("ckpt", "promote", "--config", "tiny/pretrain", "--run", "run1", "--storage", root, "--next-config", "tiny/sft")
    assert json.loads(again) == {**promoted, "reused": True}

    metadata = scan_checkpoints(layout.checkpoints_dir, options)[0].manifest.extra
    assert metadata == {"tokens_seen": 400}
    record = read_promoted_record(promoted["uri"], options)
    assert (record["stage"], record["steps"], record["tokens"], record["source_run"]) == ("pretrain", 4, 400, "run1")
    assert len(record["data_manifests"]) == 3
    assert 0 < record["heldout_loss"] < float("inf")

    code, listing = run_cli("ckpt", "list", root)
    assert code == 0
    assert "step-00000004" in listing
    assert "complete" in listing
    assert promoted["digest"] in listing


def test_cli_promote_rejects_nan(store, tiny_weights, demo_data, monkeypatch, caplog):
    root, options = store
    monkeypatch.setenv("BAGEL_DATA_ROOT", demo_data.as_uri())
    broken = dict(tiny_weights)
    broken["llm2vae.weight"] = torch.full_like(broken["llm2vae.weight"], float("nan"))
    model = Bagel(get_model_config("tiny"))
    model.load_state_dict(broken)
    manager = CheckpointManager(CheckpointConfig(storage_options=options), StageLayout(root, "bad", "pretrain"))
    manager.save(2, {"model": ModelState(model), "progress": TrainProgress(step=2)}, blocking=True)

    with caplog.at_level(logging.ERROR):
        code, output = run_cli("ckpt", "promote", "--config", "tiny/pretrain", "--run", "bad", "--storage", root)
    assert code == 2
    assert output == ""
    assert "llm2vae.weight has" in caplog.text
    assert "non-finite" in caplog.text


def read_promoted_record(uri: str, options: dict) -> dict:
    from bagel.platform.checkpoint import storage
    from bagel.platform.checkpoint.manifest import read_manifest

    fs, path = storage.open_fs(uri, options)
    return read_manifest(fs, path).extra["promoted"]

"""`bagel model summary` and the fixed embeddings (sin-cos tables, timestep features, latent patches)."""

import json
import math

import torch

from bagel.model.embeddings import sincos_2d, timestep_features
from bagel.model.vae import patchify_latents, unpatchify_latents
from bagel.platform.cli import main
from bagel.platform.exit_codes import ExitCode


def test_summary_7b_table(capsys):
    assert main(["model", "summary", "--config", "bagel-7b-mot"]) == ExitCode.SUCCESS
    output = capsys.readouterr().out
    total_line = next(line for line in output.splitlines() if line.startswith("total parameters"))
    assert "14.607B" in total_line
    assert "27.21 GiB" in output  # bf16 weights, the size of the released ema.safetensors


def test_summary_json_fields(capsys):
    assert main(["model", "summary", "--config", "tiny", "--seq-len", "512", "--json"]) == ExitCode.SUCCESS
    report = json.loads(capsys.readouterr().out)
    assert report["total_params"] == (
        report["und_expert_params"] + report["gen_expert_params"] + report["embed_tokens_params"]
        + report["lm_head_params"] + report["vit_params"] + report["connector_params"]
        + report["latent_module_params"] + report["position_table_params"]
    )
    assert report["und_expert_params"] == report["gen_expert_params"]
    assert report["flops_per_token"] > report["flops_per_token_6n"] > 0
    assert report["bytes_adam_fp32"] == 8 * report["trainable_params"]


def test_summary_attention_grows_with_seq_len(capsys):
    main(["model", "summary", "--config", "small", "--seq-len", "1024", "--json"])
    short = json.loads(capsys.readouterr().out)["flops_per_token"]
    main(["model", "summary", "--config", "small", "--seq-len", "2048", "--json"])
    long = json.loads(capsys.readouterr().out)["flops_per_token"]
    # 12 * layers * heads * head_dim per extra context token: 12 * 24 * 896 * 1024.
    assert long - short == 12 * 24 * 896 * 1024


def test_summary_unknown_config(capsys):
    assert main(["model", "summary", "--config", "70b"]) == ExitCode.USAGE_ERROR
    assert "unknown model config '70b'" in capsys.readouterr().out


def test_sincos_2d_layout():
    dim, grid = 16, 5
    table = sincos_2d(dim, grid)
    assert table.shape == (25, 16)
    row, col = 3, 2
    entry = table[row * grid + col]
    omega = [1 / 10000 ** (i / 4) for i in range(4)]
    # First half: column features [sin | cos]; second half: row features.
    expected = [math.sin(col * w) for w in omega] + [math.cos(col * w) for w in omega]
    expected += [math.sin(row * w) for w in omega] + [math.cos(row * w) for w in omega]
    torch.testing.assert_close(entry, torch.tensor(expected, dtype=torch.float32))


def test_timestep_features_cos_then_sin():
    features = timestep_features(torch.tensor([0.0, 0.5]), 8)
    torch.testing.assert_close(features[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = [math.exp(-math.log(10000) * i / 4) for i in range(4)]
    expected = [math.cos(0.5 * f) for f in freqs] + [math.sin(0.5 * f) for f in freqs]
    torch.testing.assert_close(features[1], torch.tensor(expected))


def test_latent_patchify_order_and_inverse():
    z = torch.arange(16 * 4 * 6, dtype=torch.float32).reshape(16, 4, 6)
    tokens = patchify_latents(z, 2)
    assert tokens.shape == (6, 64)
    # Token (r=1, c=2), inner (p=1, q=0), channel 5 sits at (p*2 + q)*16 + c.
    assert tokens[1 * 3 + 2, (1 * 2 + 0) * 16 + 5] == z[5, 2 + 1, 4 + 0]
    torch.testing.assert_close(unpatchify_latents(tokens, (2, 3), 2, 16), z)

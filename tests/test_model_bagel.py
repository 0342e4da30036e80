"""The BAGEL model on tiny packs: MoT == dense after init_moe, noise hiding, routing, absent loss terms."""

import copy
import dataclasses
import warnings

import pytest
import torch

from bagel.model.bagel import Bagel, build_model, shift_timesteps
from bagel.model.configs import get_model_config
from bagel.model.flops import count_parameters, meta_model, pack_training_flops
from bagel.model.loss import normalize
from bagel.model.testing import random_pack
from bagel.model.vae import FrozenVAE


@pytest.fixture(scope="module")
def config():
    return get_model_config("tiny")


@pytest.fixture(scope="module")
def vae(config):
    torch.manual_seed(0)
    return FrozenVAE(config)


@pytest.fixture(scope="module")
def model(config):
    return build_model(config, seed=0)


def _latents(vae, packed):
    return vae.encode_tokens(packed.vae_images, packed.vae_latent_grids, packed.vae_noise_seeds)


def _mot_and_dense(config):
    dense_config = copy.deepcopy(config)
    dense_config.llm.layer_module = "Qwen2DecoderLayer"
    dense = build_model(dense_config, seed=1)
    # Give the dense model non-zero llm2vae so the MSE head is exercised too.
    with torch.no_grad():
        dense.llm2vae.weight.normal_(0, 0.1)
    mot = build_model(config, seed=2)
    missing, unexpected = mot.load_state_dict(dense.state_dict(), strict=False)
    assert unexpected == []
    assert missing and all("_moe_gen" in key for key in missing)
    mot.language_model.init_moe()
    return mot, dense


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mot_copied_equals_dense(config, vae, seed):
    mot, dense = _mot_and_dense(config)
    packed = random_pack(config, seed=seed, num_samples=4)
    latents = _latents(vae, packed)
    assert packed.vae_indexes.numel() > 0
    assert packed.text_indexes.numel() > 0
    mot_out = mot.forward_hidden(packed, latents)
    dense_out = dense.forward_hidden(packed, latents)
    torch.testing.assert_close(mot_out.hidden, dense_out.hidden, atol=1e-5, rtol=1e-5)
    mot_loss, dense_loss = mot(packed, latents), dense(packed, latents)
    torch.testing.assert_close(mot_loss.ce_sum, dense_loss.ce_sum)
    torch.testing.assert_close(mot_loss.mse_sum, dense_loss.mse_sum)
    assert mot_loss.mse_tokens == dense_loss.mse_tokens > 0


def test_mot_gen_weights_change_gen_rows(config, vae):
    mot, dense = _mot_and_dense(config)
    with torch.no_grad():
        mot.language_model.model.layers[0].mlp_moe_gen.up_proj.weight.add_(0.5)
    packed = random_pack(config, seed=3, num_samples=3, kinds=["t2i", "vlm", "edit"])
    latents = _latents(vae, packed)
    diff = (mot.forward_hidden(packed, latents).hidden - dense.forward_hidden(packed, latents).hidden).abs().sum(-1)
    assert bool((diff[packed.vae_indexes] > 1e-4).all())


def test_noised_latents_hidden_later(model, config, vae):
    packed = random_pack(config, seed=4, num_samples=2, kinds=["edit", "t2i"])
    latents = _latents(vae, packed)
    noised = torch.isin(packed.vae_indexes, packed.mse_indexes)
    perturbed = latents.clone()
    perturbed[noised] += torch.randn_like(perturbed[noised]) * 3
    with torch.no_grad():
        before = model.forward_hidden(packed, latents).hidden
        after = model.forward_hidden(packed, perturbed).hidden
    changed = (before - after).abs().amax(-1) > 1e-6
    # Only tokens of the noised images' own splits (latents and their two markers) may change.
    split_modes = [mode for mode, length in zip(packed.attn_modes, packed.split_lens) for _ in range(length)]
    in_noise_split = torch.tensor([mode == "noise" for mode in split_modes])
    assert bool(changed[packed.mse_indexes].all())
    assert not bool(changed[~in_noise_split].any())
    assert int((~in_noise_split).sum()) > 0


def test_flex_forward_equals_sdpa(config, vae):
    packed = random_pack(config, seed=5, num_samples=3)
    latents = _latents(vae, packed)
    sdpa_model = build_model(dataclasses.replace(config, attn_backend="sdpa"), seed=0)
    flex_model = build_model(dataclasses.replace(config, attn_backend="flex"), seed=0)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # eager flex on CPU warns that it is unfused
        flex_hidden = flex_model.forward_hidden(packed, latents).hidden
        sdpa_hidden = sdpa_model.forward_hidden(packed, latents).hidden
    torch.testing.assert_close(flex_hidden, sdpa_hidden, atol=1e-5, rtol=1e-5)


def _expert_grads(model):
    groups = {"und": [], "gen": []}
    for name, param in model.language_model.model.named_parameters():
        if name.startswith("embed_tokens"):
            continue
        grad = param.grad
        norm = 0.0 if grad is None else float(grad.abs().sum())
        groups["gen" if "_moe_gen" in name else "und"].append(norm)
    return groups


def test_routing_und_only_batch(config):
    """Text and ViT tokens only: every gen-expert weight gets a zero gradient."""
    model = build_model(config, seed=0)
    packed = random_pack(config, seed=6, num_samples=3, kinds=["vlm", "text", "vlm"])
    assert packed.vae_indexes.numel() == 0
    assert packed.vit_indexes.numel() > 0
    sums = model(packed, None)
    normalize(sums, sums.ce_tokens, sums.mse_tokens, 1.0, 1.0).total.backward()
    grads = _expert_grads(model)
    assert all(norm == 0.0 for norm in grads["gen"])
    assert all(norm > 0.0 for norm in grads["und"])


def test_routing_gen_only_batch(config, vae):
    """VAE latent tokens only: every und-expert weight gets a zero gradient."""
    model = build_model(config, seed=0)
    with torch.no_grad():
        model.llm2vae.weight.normal_(0, 0.1)  # a zero head would give every gen weight a zero gradient
    packed = random_pack(config, seed=7, num_samples=2, kinds=["t2i", "t2i"])
    # Keep only the latent tokens: drop the captions and the image markers (all text, und expert).
    keep = packed.vae_indexes

    new_position = torch.full((packed.length,), -1, dtype=torch.long)
    new_position[keep] = torch.arange(keep.numel())
    lengths = [(rows * cols) for rows, cols in packed.vae_latent_grids]
    vae_only = dataclasses.replace(
        packed,
        sample_lens=lengths,
        split_lens=lengths,
        attn_modes=["noise"] * len(lengths),
        position_ids=torch.zeros(keep.numel(), dtype=torch.long),
        text_ids=packed.text_ids[:0],
        text_indexes=packed.text_indexes[:0],
        vae_indexes=new_position[keep],
        mse_indexes=new_position[packed.mse_indexes],
        ce_indexes=packed.ce_indexes[:0],
        ce_labels=packed.ce_labels[:0],
    )

    sums = model(vae_only, _latents(vae, packed))
    assert sums.ce_tokens == 0
    assert sums.mse_tokens == keep.numel()
    normalize(sums, sums.ce_tokens, sums.mse_tokens, 1.0, 1.0).total.backward()
    grads = _expert_grads(model)
    assert all(norm == 0.0 for norm in grads["und"])
    assert all(norm > 0.0 for norm in grads["gen"])


def test_no_ce_batch_reports_absent(model, config, vae):
    packed = random_pack(config, seed=8, num_samples=2, kinds=["t2i", "edit"])
    sums = model(packed, _latents(vae, packed))
    assert sums.ce_tokens == 0
    assert sums.mse_tokens > 0
    terms = normalize(sums, 0, sums.mse_tokens, config.ce_weight, config.mse_weight)
    assert terms.ce is None
    assert terms.mse is not None and torch.isfinite(terms.mse)
    assert torch.isfinite(terms.total)
    terms.total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)


def test_no_mse_batch_reports_absent(model, config):
    packed = random_pack(config, seed=9, num_samples=2, kinds=["vlm", "text"])
    sums = model(packed, None)
    assert sums.mse_tokens == 0
    assert sums.ce_tokens > 0
    terms = normalize(sums, sums.ce_tokens, 0, config.ce_weight, config.mse_weight)
    assert terms.mse is None
    assert terms.ce is not None and torch.isfinite(terms.ce)
    torch.testing.assert_close(terms.total, config.ce_weight * terms.ce)
    terms.total.backward()
    assert model.language_model.lm_head.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_both_terms_absent_total_zero():
    from bagel.model.loss import LossSums

    weight = torch.ones(3, requires_grad=True)
    sums = LossSums(ce_sum=weight.sum() * 0, ce_tokens=0, mse_sum=weight.sum() * 0, mse_tokens=0)
    terms = normalize(sums, 0, 0, 0.25, 1.0)
    assert terms.ce is None
    assert terms.mse is None
    assert float(terms.total.detach()) == 0.0
    terms.total.backward()
    assert torch.equal(weight.grad, torch.zeros(3))


def test_missing_vae_latents_rejected(model, config):
    packed = random_pack(config, seed=10, num_samples=1, kinds=["t2i"])
    with pytest.raises(ValueError, match="vae_latents is None"):
        model(packed, None)


def test_vae_noise_independent_of_pack(model, config, vae):
    packed_pair = random_pack(config, seed=12, num_samples=2, kinds=["t2i", "t2i"])
    latents = _latents(vae, packed_pair)
    out_pair = model.forward_hidden(packed_pair, latents)
    first_tokens = packed_pair.vae_latent_grids[0][0] * packed_pair.vae_latent_grids[0][1]
    # The first image's posterior sample does not depend on the other image in the pack.
    alone = vae.encode_tokens(packed_pair.vae_images[:1], packed_pair.vae_latent_grids[:1], packed_pair.vae_noise_seeds[:1])
    torch.testing.assert_close(alone, latents[:first_tokens])
    reference = vae.encode_tokens(packed_pair.vae_images[1:], packed_pair.vae_latent_grids[1:], packed_pair.vae_noise_seeds[1:])
    torch.testing.assert_close(reference, latents[first_tokens:])
    assert out_pair.eps.shape == latents.shape


def test_timestep_shift():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    torch.testing.assert_close(shift_timesteps(t, 1.0), t)
    shifted = shift_timesteps(t, 4.0)
    assert shifted[0] == 0.0
    assert shifted[-1] == 1.0
    torch.testing.assert_close(shifted[2], torch.tensor(0.8))


@pytest.mark.parametrize("name", ["tiny", "small", "bagel-7b-mot"])
def test_configs_build_on_meta(name):
    model = meta_model(get_model_config(name))
    assert all(p.is_meta for p in model.parameters())
    assert isinstance(model, Bagel)


def test_7b_parameter_count_on_meta():
    counts = count_parameters(meta_model(get_model_config("bagel-7b-mot")))
    assert abs(counts.total - 14.607e9) / 14.607e9 < 1e-3
    assert abs(counts.gen_expert - 6.526e9) / 6.526e9 < 1e-3
    assert abs(counts.active_per_token - 7.616e9) / 7.616e9 < 1e-3
    assert abs(counts.vit - 0.403e9) / 0.403e9 < 5e-3
    assert counts.embed_tokens == counts.lm_head == 152064 * 3584
    # The release's bf16 file is 29.21 GB.
    assert abs(2 * counts.total - 29.21e9) / 29.21e9 < 1e-3


def test_released_key_names_and_shapes():
    state = meta_model(get_model_config("bagel-7b-mot")).state_dict()
    expected = {
        "language_model.model.embed_tokens.weight": (152064, 3584),
        "language_model.lm_head.weight": (152064, 3584),
        "language_model.model.layers.0.self_attn.q_proj_moe_gen.weight": (3584, 3584),
        "language_model.model.layers.0.self_attn.k_proj_moe_gen.weight": (512, 3584),
        "language_model.model.layers.27.self_attn.q_norm_moe_gen.weight": (128,),
        "language_model.model.layers.3.mlp_moe_gen.down_proj.weight": (3584, 18944),
        "language_model.model.layers.3.post_attention_layernorm_moe_gen.weight": (3584,),
        "language_model.model.norm_moe_gen.weight": (3584,),
        "vit_model.vision_model.embeddings.patch_embedding.weight": (1152, 588),
        "vit_model.vision_model.embeddings.position_embedding.weight": (4900, 1152),
        "vit_model.vision_model.encoder.layers.25.mlp.fc2.bias": (1152,),
        "vit_model.vision_model.post_layernorm.weight": (1152,),
        "connector.fc1.weight": (3584, 1152),
        "vit_pos_embed.pos_embed": (4900, 3584),
        "latent_pos_embed.pos_embed": (4096, 3584),
        "time_embedder.mlp.0.weight": (3584, 256),
        "time_embedder.mlp.2.bias": (3584,),
        "vae2llm.weight": (3584, 64),
        "llm2vae.weight": (64, 3584),
    }
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    assert "vit_model.vision_model.encoder.layers.26.mlp.fc2.bias" not in state
    assert "language_model.model.layers.0.self_attn.o_proj.bias" not in state
    assert not any("rotary" in key or "inv_freq" in key for key in state)


def test_pack_flops_grow_with_length(config):
    small = random_pack(config, seed=13, num_samples=1)
    large = random_pack(config, seed=13, num_samples=4)
    assert 0 < pack_training_flops(config, small) < pack_training_flops(config, large)

"""Model configs: the three named configs, overrides and validation errors."""

import pytest

from bagel.model.configs import apply_overrides, get_model_config
from bagel.model.inputs import SpecialTokens


def test_tiny_keeps_structural_features():
    config = get_model_config("tiny")
    assert config.llm.num_attention_heads > config.llm.num_key_value_heads  # GQA
    assert config.llm.qk_norm
    assert config.llm.is_mot
    assert config.vit.num_layers_used == config.vit.num_hidden_layers - 1
    assert config.latent_channels == 64
    assert config.latent_downsample == 16
    assert config.special_tokens == SpecialTokens(bos=256, eos=257, start_of_image=258, end_of_image=259)


def test_released_config_values():
    config = get_model_config("bagel-7b-mot")
    assert config.special_tokens == SpecialTokens(151644, 151645, 151652, 151653)
    assert config.llm.head_dim == 128
    assert config.vit.num_layers_used == 26
    assert config.max_latent_size == 64
    assert config.ce_weight == 0.25
    assert config.mse_weight == 1.0
    assert config.attn_backend == "auto"


def test_configs_are_fresh_copies():
    first = get_model_config("tiny")
    first.llm.num_hidden_layers = 9
    assert get_model_config("tiny").llm.num_hidden_layers == 2


def test_overrides_nested_fields():
    config = apply_overrides(
        get_model_config("tiny"),
        {"llm": {"num_hidden_layers": 3}, "timestep_shift": 4.0, "special_tokens": {"bos": 1}, "vae": {"ch_mult": [1, 1, 1, 1]}},
    )
    assert config.llm.num_hidden_layers == 3
    assert config.timestep_shift == 4.0
    assert config.special_tokens.bos == 1
    assert config.vae.ch_mult == (1, 1, 1, 1)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"llm": {"num_layerz": 3}}, "unknown model config field 'llm.num_layerz'"),
        ({"attn_backend": "xformers"}, "attn_backend='xformers' is invalid"),
        ({"llm": {"num_key_value_heads": 3}}, "not a multiple of num_key_value_heads=3"),
        ({"vit_cond_dropout_prob": 1.5}, "vit_cond_dropout_prob=1.5 is invalid"),
        ({"special_tokens": {"eos": 600}}, "outside vocab_size=512"),
        ({"vit_max_num_patch_per_side": 9}, "exceeds the ViT position table"),
        ({"llm": {"tie_word_embeddings": True}}, "tie_word_embeddings=True is unsupported"),
    ],
)
def test_invalid_overrides_rejected(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        apply_overrides(get_model_config("tiny"), overrides)


def test_unknown_name_rejected():
    with pytest.raises(ValueError, match="unknown model config 'huge'"):
        get_model_config("huge")

"""Model configurations: the released BAGEL-7B-MoT, a 0.5B-class backbone, and a CPU-sized tiny model.

`get_model_config(name)` returns a fresh `BagelConfig`; callers may change
fields on the copy (the trainer applies YAML overrides with `apply_overrides`).
Field names follow the released `llm_config.json` / `vit_config.json` keys so
that those files map onto these dataclasses one to one.
"""

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from bagel.model.inputs import SpecialTokens

ATTN_BACKENDS = ("auto", "flex", "sdpa")
LAYER_MODULES = ("Qwen2MoTDecoderLayer", "Qwen2DecoderLayer")


@dataclass
class LLMConfig:
    """Qwen2.5 decoder with BAGEL's Mixture-of-Transformers duplication."""

    num_hidden_layers: int = 28
    """Decoder layers; in the MoT variant each layer contains both experts."""
    hidden_size: int = 3584
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    """Grouped-query attention: each KV head serves num_attention_heads / num_key_value_heads query heads."""
    intermediate_size: int = 18944
    """SwiGLU inner width (gate/up/down, no bias)."""
    vocab_size: int = 152064
    """Rows of the shared token embedding and of the untied lm_head."""
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    qk_norm: bool = True
    """Per-head RMSNorm on q and k before RoPE (added by BAGEL; Qwen checkpoints lack it)."""
    tie_word_embeddings: bool = False
    """BAGEL always unties lm_head from embed_tokens; True is rejected."""
    layer_module: str = "Qwen2MoTDecoderLayer"
    """"Qwen2MoTDecoderLayer" (both experts) or "Qwen2DecoderLayer" (dense: every token uses the und weights)."""
    initializer_range: float = 0.02
    """Std of the normal init of LLM linears and embeddings when training from scratch."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def is_mot(self) -> bool:
        return self.layer_module == "Qwen2MoTDecoderLayer"


@dataclass
class ViTConfig:
    """SigLIP NaViT vision encoder (the `vit_config.json` keys)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_attention_heads: int = 16
    num_hidden_layers: int = 27
    """Layers in the released config; BAGEL builds num_hidden_layers + 1 + select_layer of them."""
    patch_size: int = 14
    image_size: int = 980
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    select_layer: int = -2
    """-2 drops the last encoder layer (BAGEL's vit_select_layer); post_layernorm still applies."""

    @property
    def num_layers_used(self) -> int:
        return self.num_hidden_layers + 1 + self.select_layer

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patch_dim(self) -> int:
        """Input width of the linear patch embedding: channels * patch * patch."""
        return self.num_channels * self.patch_size * self.patch_size


@dataclass
class VAEConfig:
    """FLUX autoencoder (torchtitan's AutoEncoder.Config fields) with BAGEL's latent scale and shift."""

    resolution: int = 256
    in_channels: int = 3
    ch: int = 128
    """Base channel width; GroupNorm(32) needs a multiple of 32."""
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    """One entry per resolution level; len(ch_mult) - 1 halvings give the 8x downsample."""
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass
class BagelConfig:
    """Everything that fixes BAGEL's module shapes, its sequence layout and its losses."""

    llm: LLMConfig = field(default_factory=LLMConfig)
    vit: ViTConfig = field(default_factory=ViTConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    special_tokens: SpecialTokens = field(
        default_factory=lambda: SpecialTokens(bos=151644, eos=151645, start_of_image=151652, end_of_image=151653)
    )
    latent_patch_size: int = 2
    """Latent pixels per side of one gen token: 2x2 patches of 16 channels give 64-dim tokens."""
    max_latent_size: int = 64
    """Side of the latent position table in patches (64 -> 1024 px images); latent position id = r * max_latent_size + c."""
    vit_max_num_patch_per_side: int = 70
    """Side of the ViT position tables in patches (70 * 14 = 980 px); ViT position id = r * 70 + c."""
    connector_act: str = "gelu_pytorch_tanh"
    timestep_shift: float = 1.0
    """Flow-matching shift s in t <- s*t / (1 + (s-1)*t); 1.0 in pre-training, 4.0 at high resolution."""
    timestep_frequency_dim: int = 256
    """Width of the sinusoidal timestep features fed to time_embedder."""
    attn_backend: str = "auto"
    """"flex" (FlexAttention BlockMask), "sdpa" (dense boolean mask), or "auto": flex on CUDA, sdpa on CPU."""
    flex_block_size: int = 128
    """BlockMask tile size in tokens."""
    flex_pad_to: int = 0
    """Pad FlexAttention to this many tokens (e.g. the packing's max tokens) for one static compiled shape.
    0, or a pack longer than this, pads to the next multiple of flex_block_size."""
    ce_weight: float = 0.25
    """Weight of the next-token CE term (BAGEL's paper: CE:MSE = 0.25:1)."""
    mse_weight: float = 1.0
    text_cond_dropout_prob: float = 0.1
    """Probability to drop a CFG-droppable text item (paper: 0.1)."""
    vit_cond_dropout_prob: float = 0.5
    """Probability to drop a CFG-droppable ViT image (paper: 0.5; the released code defaults to 0.3)."""
    vae_cond_dropout_prob: float = 0.1
    """Probability to drop a CFG-droppable clean VAE image (paper: 0.1; the released code defaults to 0.3)."""

    @property
    def latent_downsample(self) -> int:
        """Pixels per side of one gen token (VAE downsample * latent patch)."""
        return self.vae.downsample * self.latent_patch_size

    @property
    def latent_channels(self) -> int:
        """Width of one gen token: patch * patch * z_channels (64 for FLUX)."""
        return self.latent_patch_size**2 * self.vae.z_channels

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        llm, vit = self.llm, self.vit

        if self.attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"attn_backend={self.attn_backend!r} is invalid: use one of {ATTN_BACKENDS}")
        if llm.layer_module not in LAYER_MODULES:
            raise ValueError(f"llm.layer_module={llm.layer_module!r} is invalid: use one of {LAYER_MODULES}")
        if llm.tie_word_embeddings:
            raise ValueError("llm.tie_word_embeddings=True is unsupported: BAGEL keeps lm_head separate")
        if llm.hidden_size % llm.num_attention_heads:
            raise ValueError(
                f"llm.hidden_size={llm.hidden_size} is not divisible by num_attention_heads={llm.num_attention_heads}"
            )
        if llm.num_attention_heads % llm.num_key_value_heads:
            raise ValueError(
                f"llm.num_attention_heads={llm.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={llm.num_key_value_heads}"
            )
        if llm.head_dim % 2:
            raise ValueError(f"llm head_dim={llm.head_dim} must be even for RoPE")
        if llm.hidden_size % 4:
            raise ValueError(f"llm.hidden_size={llm.hidden_size} must be a multiple of 4 for the 2D sin-cos tables")

        if vit.hidden_size % vit.num_attention_heads:
            raise ValueError(
                f"vit.hidden_size={vit.hidden_size} is not divisible by num_attention_heads={vit.num_attention_heads}"
            )
        table_side = vit.image_size // vit.patch_size
        if self.vit_max_num_patch_per_side > table_side:
            raise ValueError(
                f"vit_max_num_patch_per_side={self.vit_max_num_patch_per_side} exceeds the ViT position table "
                f"side vit.image_size // vit.patch_size = {table_side}: lower it or raise vit.image_size"
            )
        if vit.num_layers_used < 1:
            raise ValueError(
                f"vit.num_hidden_layers={vit.num_hidden_layers} with select_layer={vit.select_layer} leaves no layer"
            )

        if self.vae.ch % 32:
            raise ValueError(f"vae.ch={self.vae.ch} must be a multiple of 32 (GroupNorm with 32 groups)")
        for name in ("text_cond_dropout_prob", "vit_cond_dropout_prob", "vae_cond_dropout_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value} is invalid: use a probability in [0, 1]")
        if self.timestep_shift <= 0:
            raise ValueError(f"timestep_shift={self.timestep_shift} is invalid: use a positive number")
        ids = dataclasses.astuple(self.special_tokens)
        if max(ids) >= llm.vocab_size or min(ids) < 0:
            raise ValueError(f"special_tokens {self.special_tokens} fall outside vocab_size={llm.vocab_size}")


def _bagel_7b_mot() -> BagelConfig:
    return BagelConfig()


def _small() -> BagelConfig:
    # Qwen2.5-0.5B backbone (vocab 151936) with the real SigLIP NaViT and FLUX VAE.
    llm = LLMConfig(
        num_hidden_layers=24,
        hidden_size=896,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        vocab_size=151936,
    )
    return BagelConfig(llm=llm)


def _tiny() -> BagelConfig:
    # Every structural feature of the 7B model at CPU-test size: GQA, QK-norm,
    # MoT duplication, a dropped last ViT layer, the 8x VAE downsample and the
    # 64-dim latent token. Ids 0-255 are bytes in the byte-level tiny tokenizer.
    llm = LLMConfig(
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=176,
        vocab_size=512,
        max_position_embeddings=4096,
    )
    vit = ViTConfig(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_hidden_layers=3,
        patch_size=14,
        image_size=112,
    )
    vae = VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, z_channels=16)
    return BagelConfig(
        llm=llm,
        vit=vit,
        vae=vae,
        special_tokens=SpecialTokens(bos=256, eos=257, start_of_image=258, end_of_image=259),
        max_latent_size=8,
        vit_max_num_patch_per_side=8,
    )


_CONFIGS = {"tiny": _tiny, "small": _small, "bagel-7b-mot": _bagel_7b_mot}
MODEL_NAMES = tuple(_CONFIGS)


def get_model_config(name: str) -> BagelConfig:
    """Return a fresh, validated copy of the named config ("tiny", "small" or "bagel-7b-mot")."""
    if name not in _CONFIGS:
        raise ValueError(f"unknown model config {name!r}: use one of {', '.join(MODEL_NAMES)}")
    config = _CONFIGS[name]()
    config.validate()
    return config


def apply_overrides(config: BagelConfig, overrides: dict[str, Any]) -> BagelConfig:
    """Return a copy of `config` with nested fields replaced, e.g. {"llm": {"num_hidden_layers": 4}}.

    Raises ValueError naming an unknown field, then validates the result.
    """
    result = copy.deepcopy(config)
    _apply(result, overrides, prefix="")
    result.validate()
    return result


def _apply(target: Any, overrides: dict[str, Any], prefix: str) -> None:
    names = {f.name for f in dataclasses.fields(target)}
    for key, value in overrides.items():
        if key not in names:
            raise ValueError(f"unknown model config field '{prefix}{key}': valid fields are {sorted(names)}")
        current = getattr(target, key)
        if isinstance(value, dict) and dataclasses.is_dataclass(current):
            if isinstance(current, SpecialTokens):
                setattr(target, key, dataclasses.replace(current, **value))
            else:
                _apply(current, value, prefix=f"{prefix}{key}.")
        elif isinstance(current, tuple):
            setattr(target, key, tuple(value))
        else:
            setattr(target, key, value)

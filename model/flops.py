"""Parameter counts and training FLOPs of BAGEL, aware that each token runs through one expert.

Conventions follow torchtitan. A matmul with P weights costs 6P FLOPs per
token for forward + backward. Attention costs 12 * layers * heads * head_dim * T
per token, where T is the full length of the token's sample (not halved for
causality). Counts come from the module tree, so they work on a meta-device
model.
"""

from dataclasses import dataclass

import torch
from torch import nn

from bagel.model.configs import BagelConfig
from bagel.model.inputs import PackedSequence


@dataclass
class ParameterCounts:
    """Parameter counts of a Bagel, grouped by role."""

    total: int
    und_expert: int  # decoder layers' und weights + norm
    gen_expert: int  # decoder layers' _moe_gen weights + norm_moe_gen
    embed_tokens: int
    lm_head: int
    vit: int
    connector: int
    latent_modules: int  # vae2llm + llm2vae + time_embedder
    position_tables: int  # the two fixed sin-cos tables (stored, never trained)

    @property
    def trainable(self) -> int:
        return self.total - self.position_tables

    @property
    def active_per_token(self) -> int:
        """One expert plus the shared embedding and lm_head (the "7B active" of BAGEL-7B-MoT)."""
        return self.und_expert + self.embed_tokens + self.lm_head


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_parameters(model: nn.Module) -> ParameterCounts:
    """Count a Bagel's parameters by role (works on the meta device)."""
    decoder = model.language_model.model
    und = gen = 0
    for name, param in decoder.named_parameters():
        if name.startswith("embed_tokens"):
            continue
        if "_moe_gen" in name:
            gen += param.numel()
        else:
            und += param.numel()
    return ParameterCounts(
        total=_numel(model),
        und_expert=und,
        gen_expert=gen,
        embed_tokens=decoder.embed_tokens.weight.numel(),
        lm_head=model.language_model.lm_head.weight.numel(),
        vit=_numel(model.vit_model),
        connector=_numel(model.connector),
        latent_modules=_numel(model.vae2llm) + _numel(model.llm2vae) + _numel(model.time_embedder),
        position_tables=_numel(model.vit_pos_embed) + _numel(model.latent_pos_embed),
    )


def _expert_layer_params(config: BagelConfig) -> int:
    """Return the matmul weights a token passes through in one decoder layer of one expert (norms excluded)."""
    llm = config.llm
    q_dim = llm.num_attention_heads * llm.head_dim
    kv_dim = llm.num_key_value_heads * llm.head_dim
    attention = llm.hidden_size * (q_dim + 2 * kv_dim) + q_dim * llm.hidden_size
    mlp = 3 * llm.hidden_size * llm.intermediate_size
    return attention + mlp


def _vit_layer_params(config: BagelConfig) -> int:
    vit = config.vit
    return 4 * vit.hidden_size**2 + 2 * vit.hidden_size * vit.intermediate_size


def llm_flops_per_token(config: BagelConfig, seq_len: int) -> float:
    """Return the training FLOPs of one LLM token (one expert + lm_head) attending over a `seq_len`-token sample."""
    llm = config.llm
    dense = 6 * (llm.num_hidden_layers * _expert_layer_params(config) + llm.hidden_size * llm.vocab_size)
    attention = 12 * llm.num_hidden_layers * llm.num_attention_heads * llm.head_dim * seq_len
    return float(dense + attention)


def vit_flops_per_token(config: BagelConfig, image_tokens: int) -> float:
    """Return the training FLOPs of one ViT patch in an image of `image_tokens` patches (ViT + connector, not the LLM)."""
    vit = config.vit
    dense = 6 * (
        vit.num_layers_used * _vit_layer_params(config)
        + vit.patch_dim * vit.hidden_size
        + vit.hidden_size * config.llm.hidden_size
        + config.llm.hidden_size**2
    )
    attention = 12 * vit.num_layers_used * vit.hidden_size * image_tokens
    return float(dense + attention)


def pack_training_flops(config: BagelConfig, packed: PackedSequence) -> float:
    """Return the training FLOPs of one packed sequence (for MFU).

    Every token pays one expert's layers. lm_head runs only at CE positions and
    llm2vae only at MSE positions. Attention uses each sample's full length.
    ViT patches also pay the ViT and the connector, and VAE tokens pay vae2llm
    and the timestep MLP. The frozen VAE encoder (forward only) is not counted.
    """
    llm = config.llm
    hidden = llm.hidden_size
    length = packed.length
    flops = 6 * llm.num_hidden_layers * _expert_layer_params(config) * length
    flops += 12 * llm.num_hidden_layers * llm.num_attention_heads * llm.head_dim * sum(n * n for n in packed.sample_lens)
    flops += 6 * hidden * llm.vocab_size * packed.ce_indexes.numel()

    vit = config.vit
    n_vit = packed.vit_indexes.numel()
    seqlens = packed.vit_token_seqlens.tolist()
    flops += 6 * n_vit * (
        vit.num_layers_used * _vit_layer_params(config) + vit.patch_dim * vit.hidden_size
        + vit.hidden_size * hidden + hidden * hidden
    )
    flops += 12 * vit.num_layers_used * vit.hidden_size * sum(n * n for n in seqlens)

    n_vae = packed.vae_indexes.numel()
    latent = config.latent_channels
    flops += 6 * n_vae * (latent * hidden + config.timestep_frequency_dim * hidden + hidden * hidden)
    flops += 6 * packed.mse_indexes.numel() * hidden * latent
    return float(flops)


@dataclass
class MemoryEstimate:
    """Bytes of training state, unsharded (divide by the FSDP shard count for one GPU)."""

    weights_fp32: int
    weights_bf16: int
    grads_fp32: int
    adam_fp32: int  # exp_avg + exp_avg_sq
    ema_fp32: int

    @property
    def total(self) -> int:
        return self.weights_fp32 + self.grads_fp32 + self.adam_fp32 + self.ema_fp32


def training_memory(counts: ParameterCounts) -> MemoryEstimate:
    """Estimate fp32-master training state: weights, grads and Adam of trainable params, EMA of all."""
    return MemoryEstimate(
        weights_fp32=4 * counts.total,
        weights_bf16=2 * counts.total,
        grads_fp32=4 * counts.trainable,
        adam_fp32=8 * counts.trainable,
        ema_fp32=4 * counts.total,
    )


def meta_model(config: BagelConfig) -> nn.Module:
    """Build a Bagel on the meta device (no memory, no init) for counting."""
    from bagel.model.bagel import Bagel

    with torch.device("meta"):
        return Bagel(config)

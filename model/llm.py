"""Qwen2.5 decoder with BAGEL's Mixture-of-Transformers (MoT) layers, over one packed sequence.

Module and parameter names are those of the released checkpoint
(`language_model.model.layers.{i}.self_attn.q_proj_moe_gen`, ...). In the MoT
variant every block weight has a `_moe_gen` twin used by the generation
expert; routing is fixed by token type (`Routing`). With
`layer_module="Qwen2DecoderLayer"` the twins do not exist and every token
uses the understanding weights (the dense Qwen2 reference).

Shapes inside forward never come from the config head counts (only head_dim
does), so tensor-parallel sharded projections work unchanged.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bagel.model.attention import joint_attention
from bagel.model.configs import LLMConfig


@dataclass
class Routing:
    """Packed positions per expert, plus the permutation `inverse` that restores packed order after cat(und, gen)."""

    und_indexes: torch.Tensor  # long [N_und], sorted positions of text and ViT tokens
    gen_indexes: torch.Tensor  # long [N_gen], sorted positions of VAE latent tokens
    inverse: torch.Tensor  # long [L]: cat([x_und, x_gen])[inverse] is in packed order

    @classmethod
    def from_gen_indexes(cls, length: int, gen_indexes: torch.Tensor) -> "Routing":
        device = gen_indexes.device
        is_gen = torch.zeros(length, dtype=torch.bool, device=device)
        is_gen[gen_indexes] = True
        und = torch.nonzero(~is_gen, as_tuple=True)[0]
        gen = torch.nonzero(is_gen, as_tuple=True)[0]
        inverse = torch.argsort(torch.cat([und, gen]))
        return cls(und, gen, inverse)

    def merge(self, und: torch.Tensor, gen: torch.Tensor) -> torch.Tensor:
        """Interleave per-expert rows back into packed order (differentiable gather)."""
        return torch.cat([und, gen])[self.inverse]


class Qwen2RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back (Qwen2's numerics)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class Qwen2MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return cos, sin [L, head_dim] of 1D RoPE for positions [L] (Qwen2 layout: frequencies repeated twice)."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device) / head_dim)
    )
    freqs = position_ids.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [L, H, D] by cos/sin [L, D]."""
    return x * cos[:, None, :] + _rotate_half(x) * sin[:, None, :]


class PackedAttentionMoT(nn.Module):
    """Per-expert q/k/v/o projections and QK-norms around one joint attention.

    `attention_fn(q, k, v, mask)` is a plain attribute so a trainer can swap it
    (context parallelism) without touching the weights.
    """

    def __init__(self, config: LLMConfig) -> None:
        super().__init__()
        hidden, head_dim = config.hidden_size, config.head_dim
        q_dim = config.num_attention_heads * head_dim
        kv_dim = config.num_key_value_heads * head_dim
        self.head_dim = head_dim
        self.is_mot = config.is_mot
        self.attention_fn: Callable = joint_attention

        self.q_proj = nn.Linear(hidden, q_dim, bias=True)
        self.k_proj = nn.Linear(hidden, kv_dim, bias=True)
        self.v_proj = nn.Linear(hidden, kv_dim, bias=True)
        self.o_proj = nn.Linear(q_dim, hidden, bias=False)
        self.q_norm = Qwen2RMSNorm(head_dim, config.rms_norm_eps) if config.qk_norm else nn.Identity()
        self.k_norm = Qwen2RMSNorm(head_dim, config.rms_norm_eps) if config.qk_norm else nn.Identity()
        if self.is_mot:
            self.q_proj_moe_gen = nn.Linear(hidden, q_dim, bias=True)
            self.k_proj_moe_gen = nn.Linear(hidden, kv_dim, bias=True)
            self.v_proj_moe_gen = nn.Linear(hidden, kv_dim, bias=True)
            self.o_proj_moe_gen = nn.Linear(q_dim, hidden, bias=False)
            self.q_norm_moe_gen = Qwen2RMSNorm(head_dim, config.rms_norm_eps) if config.qk_norm else nn.Identity()
            self.k_norm_moe_gen = Qwen2RMSNorm(head_dim, config.rms_norm_eps) if config.qk_norm else nn.Identity()

    def _qkv(self, x: torch.Tensor, gen: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        suffix = "_moe_gen" if gen else ""
        # unflatten, unlike view(rows, -1, head_dim), also works for an expert with 0 rows.
        heads = (-1, self.head_dim)
        q = getattr(self, "q_proj" + suffix)(x).unflatten(-1, heads)
        k = getattr(self, "k_proj" + suffix)(x).unflatten(-1, heads)
        v = getattr(self, "v_proj" + suffix)(x).unflatten(-1, heads)
        q = getattr(self, "q_norm" + suffix)(q)
        k = getattr(self, "k_norm" + suffix)(k)
        return q, k, v

    def forward(
        self,
        x_und: torch.Tensor,
        x_gen: torch.Tensor | None,
        routing: Routing | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend normalised rows x_und [N_und, D] and x_gen [N_gen, D]; return the o_proj outputs per expert.

        Dense layers pass every row as x_und with x_gen and routing None.
        """
        q, k, v = self._qkv(x_und, gen=False)
        if self.is_mot:
            q_gen, k_gen, v_gen = self._qkv(x_gen, gen=True)
            q = routing.merge(q, q_gen)
            k = routing.merge(k, k_gen)
            v = routing.merge(v, v_gen)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        out = self.attention_fn(q, k, v, mask)
        out = out.flatten(-2)
        if not self.is_mot:
            return self.o_proj(out), None
        return self.o_proj(out[routing.und_indexes]), self.o_proj_moe_gen(out[routing.gen_indexes])


class Qwen2MoTDecoderLayer(nn.Module):
    """One decoder layer holding both experts (MoT) or only the und weights (dense)."""

    def __init__(self, config: LLMConfig) -> None:
        super().__init__()
        self.is_mot = config.is_mot
        self.self_attn = PackedAttentionMoT(config)
        self.mlp = Qwen2MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = Qwen2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = Qwen2RMSNorm(config.hidden_size, config.rms_norm_eps)
        if self.is_mot:
            self.mlp_moe_gen = Qwen2MLP(config.hidden_size, config.intermediate_size)
            self.input_layernorm_moe_gen = Qwen2RMSNorm(config.hidden_size, config.rms_norm_eps)
            self.post_attention_layernorm_moe_gen = Qwen2RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, hidden: torch.Tensor, routing: Routing | None, cos: torch.Tensor, sin: torch.Tensor, mask
    ) -> torch.Tensor:
        """Map hidden [L, D] in packed order to the layer output [L, D]."""
        if not self.is_mot:
            attn, _ = self.self_attn(self.input_layernorm(hidden), None, None, cos, sin, mask)
            hidden = hidden + attn
            return hidden + self.mlp(self.post_attention_layernorm(hidden))

        h_und = hidden[routing.und_indexes]
        h_gen = hidden[routing.gen_indexes]
        attn_und, attn_gen = self.self_attn(
            self.input_layernorm(h_und), self.input_layernorm_moe_gen(h_gen), routing, cos, sin, mask
        )
        h_und = h_und + attn_und
        h_gen = h_gen + attn_gen
        h_und = h_und + self.mlp(self.post_attention_layernorm(h_und))
        h_gen = h_gen + self.mlp_moe_gen(self.post_attention_layernorm_moe_gen(h_gen))
        return routing.merge(h_und, h_gen)


class Qwen2Model(nn.Module):
    """Token embedding, decoder layers and the per-expert final norms."""

    def __init__(self, config: LLMConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Qwen2MoTDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = Qwen2RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.is_mot:
            self.norm_moe_gen = Qwen2RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, routing: Routing | None, mask
    ) -> torch.Tensor:
        """Run inputs_embeds [L, D] through every layer; return normalised final hidden states [L, D]."""
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, inputs_embeds.dtype)
        hidden = inputs_embeds
        for layer in self.layers:
            hidden = layer(hidden, routing, cos, sin, mask)
        if not self.config.is_mot:
            return self.norm(hidden)
        return routing.merge(
            self.norm(hidden[routing.und_indexes]), self.norm_moe_gen(hidden[routing.gen_indexes])
        )


class Qwen2ForCausalLM(nn.Module):
    """`language_model`: the decoder plus the untied lm_head."""

    def __init__(self, config: LLMConfig) -> None:
        super().__init__()
        self.model = Qwen2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @torch.no_grad()
    def init_moe(self) -> None:
        """Copy every und weight into its `_moe_gen` twin, so the MoT model equals the dense one."""
        if not self.model.config.is_mot:
            return
        for layer in self.model.layers:
            for module in (layer, layer.self_attn):
                for name, child in list(module.named_children()):
                    twin = getattr(module, name + "_moe_gen", None)
                    if twin is not None:
                        for (_, source), (_, target) in zip(child.named_parameters(), twin.named_parameters()):
                            target.copy_(source)
        self.model.norm_moe_gen.weight.copy_(self.model.norm.weight)

"""The BAGEL model: MoT decoder, SigLIP NaViT, connector, latent path and the two training losses.

Input embedding of a packed sequence [L, D], in packed order:
- text rows: embed_tokens(text_ids);
- ViT rows: connector(vit_model(patches)) + vit_pos_embed(vit_position_ids);
- VAE rows: vae2llm(x_t) + time_embedder(t) + latent_pos_embed(vae_position_ids),
  with x_t = (1 - t) * x0 + t * eps and t = shift(sigmoid(logit)) (0 for clean images).
Text and ViT rows go to the understanding expert, VAE rows to the generation
expert; one joint attention runs over the whole sequence.
Losses: CE of lm_head(h) at ce_indexes, and MSE of llm2vae(h) against the
velocity eps - x0 at mse_indexes (see `bagel.model.loss`).
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bagel.model.attention_mask import build_attention_mask, resolve_backend
from bagel.model.configs import BagelConfig
from bagel.model.embeddings import MLPconnector, PositionEmbedding, TimestepEmbedder
from bagel.model.inputs import PackedSequence
from bagel.model.llm import Qwen2ForCausalLM, Qwen2RMSNorm, Routing
from bagel.model.loss import LossSums
from bagel.model.sequence import derive_seed
from bagel.model.vae import FLOW_NOISE_STREAM
from bagel.model.vit import SiglipVisionModel

logger = logging.getLogger(__name__)


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Apply the flow-matching shift t <- s*t / (1 + (s-1)*t); s > 1 moves t toward noise (t = 1)."""
    return shift * t / (1 + (shift - 1) * t)


@dataclass
class ForwardOutput:
    """Final hidden states and the flow-matching tensors of one forward pass."""

    hidden: torch.Tensor  # [L, D] after the per-expert final norms
    x0: torch.Tensor | None  # [N_vae, 64] clean latent tokens
    eps: torch.Tensor | None  # [N_vae, 64] flow-matching noise
    t: torch.Tensor | None  # [N_vae] timesteps after sigmoid and shift


class Bagel(nn.Module):
    """BAGEL with the released checkpoint's module names; the VAE is not a submodule."""

    def __init__(self, config: BagelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        hidden = config.llm.hidden_size
        self.language_model = Qwen2ForCausalLM(config.llm)
        self.vit_model = SiglipVisionModel(config.vit)
        self.connector = MLPconnector(config.vit.hidden_size, hidden)
        self.vit_pos_embed = PositionEmbedding(config.vit_max_num_patch_per_side, hidden)
        self.time_embedder = TimestepEmbedder(hidden, config.timestep_frequency_dim)
        self.vae2llm = nn.Linear(config.latent_channels, hidden)
        self.llm2vae = nn.Linear(hidden, config.latent_channels)
        self.latent_pos_embed = PositionEmbedding(config.max_latent_size, hidden)

    # ------------------------------------------------------------------ init

    @torch.no_grad()
    def init_weights(self, copy_init_moe: bool = True) -> None:
        """Initialise every parameter in place (works after `to_empty` on a meta-built model).

        LLM linears and embeddings: normal(0, initializer_range), biases 0, norms
        1. ViT, connector, vae2llm and time_embedder: PyTorch's default init.
        llm2vae: zeros. Sin-cos tables: regenerated. With `copy_init_moe` the
        generation expert starts as a copy of the understanding expert.
        """
        std = self.config.llm.initializer_range
        for module in self.language_model.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, Qwen2RMSNorm):
                module.reset_parameters()
        for part in (self.vit_model, self.connector, self.time_embedder, self.vae2llm):
            for module in part.modules():
                if isinstance(module, (nn.Linear, nn.LayerNorm, nn.Embedding)):
                    module.reset_parameters()
        nn.init.zeros_(self.llm2vae.weight)
        nn.init.zeros_(self.llm2vae.bias)
        self.vit_pos_embed.reset_parameters()
        self.latent_pos_embed.reset_parameters()
        if copy_init_moe:
            self.language_model.init_moe()

    def set_attention_fn(self, fn: Callable) -> None:
        """Replace the joint attention `fn(q, k, v, mask) -> out` of every decoder layer."""
        for layer in self.language_model.model.layers:
            layer.self_attn.attention_fn = fn

    def experts(self) -> dict[str, list[nn.Parameter]]:
        """Group the decoder's parameters by expert: {"und": [...], "gen": [...]} (shared ones excluded)."""
        groups: dict[str, list[nn.Parameter]] = {"und": [], "gen": []}
        model = self.language_model.model
        for name, param in model.named_parameters():
            if name.startswith("embed_tokens"):
                continue
            groups["gen" if "_moe_gen" in name else "und"].append(param)
        return groups

    # --------------------------------------------------------------- forward

    def attention_backend(self, device: torch.device) -> str:
        return resolve_backend(self.config.attn_backend, device)

    def build_mask(self, packed: PackedSequence, device: torch.device):
        """Build the generalized causal mask of `packed` for the configured backend."""
        return build_attention_mask(
            packed.sample_lens,
            packed.split_lens,
            packed.attn_modes,
            self.attention_backend(device),
            device,
            self.config.flex_block_size,
            self.config.flex_pad_to,
        )

    def _flow_inputs(
        self, packed: PackedSequence, vae_latents: torch.Tensor, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return x0 [N_vae, 64] (float32), eps [N_vae, 64] drawn per image from its seed, and t [N_vae]."""
        x0 = vae_latents.to(device=device, dtype=torch.float32)
        counts = [rows * cols for rows, cols in packed.vae_latent_grids]
        if sum(counts) != x0.shape[0] or x0.shape[0] != packed.vae_indexes.numel():
            raise ValueError(
                f"vae_latents has {x0.shape[0]} rows but the pack has {packed.vae_indexes.numel()} VAE tokens "
                f"(grids {packed.vae_latent_grids}): encode exactly packed.vae_images"
            )
        noises = []
        for count, seed in zip(counts, packed.vae_noise_seeds):
            generator = torch.Generator(device=device).manual_seed(derive_seed(seed, FLOW_NOISE_STREAM))
            noises.append(torch.randn(count, x0.shape[1], generator=generator, device=device, dtype=torch.float32))
        eps = torch.cat(noises)
        t = shift_timesteps(torch.sigmoid(packed.vae_timestep_logits.to(device).float()), self.config.timestep_shift)
        return x0, eps, t

    def forward_hidden(self, packed: PackedSequence, vae_latents: torch.Tensor | None = None) -> ForwardOutput:
        """Embed `packed` (on the model's device), run the decoder; return the final hidden states."""
        embed = self.language_model.model.embed_tokens
        device = embed.weight.device
        length = packed.length
        parts, indexes = [], []

        parts.append(embed(packed.text_ids))
        indexes.append(packed.text_indexes)

        if packed.vit_indexes.numel():
            seqlens = packed.vit_token_seqlens.tolist()
            vit_out = self.vit_model(packed.vit_patches, packed.vit_position_ids, seqlens)
            parts.append(self.connector(vit_out) + self.vit_pos_embed(packed.vit_position_ids))
            indexes.append(packed.vit_indexes)

        x0 = eps = t = None
        if packed.vae_indexes.numel():
            if vae_latents is None:
                raise ValueError(
                    f"the pack has {packed.vae_indexes.numel()} VAE tokens but vae_latents is None: "
                    "pass FrozenVAE.encode_tokens(packed.vae_images, packed.vae_latent_grids, packed.vae_noise_seeds)"
                )
            x0, eps, t = self._flow_inputs(packed, vae_latents, device)
            x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
            vae_in = self.vae2llm(x_t.to(self.vae2llm.weight.dtype))
            parts.append(vae_in + self.time_embedder(t) + self.latent_pos_embed(packed.vae_position_ids))
            indexes.append(packed.vae_indexes)

        order = torch.cat(indexes)
        if order.numel() != length:
            raise ValueError(f"the pack places {order.numel()} tokens but its sample_lens sum to {length}")
        dtype = parts[0].dtype
        inputs = torch.cat([part.to(dtype) for part in parts])[torch.argsort(order)]

        routing = Routing.from_gen_indexes(length, packed.vae_indexes) if self.config.llm.is_mot else None
        mask = self.build_mask(packed, device)
        hidden = self.language_model.model(inputs, packed.position_ids, routing, mask)
        return ForwardOutput(hidden=hidden, x0=x0, eps=eps, t=t)

    def forward(self, packed: PackedSequence, vae_latents: torch.Tensor | None = None) -> LossSums:
        """Return the CE and MSE sums of one packed sequence (already on the model's device)."""
        out = self.forward_hidden(packed, vae_latents)
        hidden = out.hidden

        logits = self.language_model.lm_head(hidden[packed.ce_indexes])
        ce_sum = F.cross_entropy(logits.float(), packed.ce_labels, reduction="sum")

        mse_count = packed.mse_indexes.numel()
        prediction = self.llm2vae(hidden[packed.mse_indexes])
        if mse_count:
            # Rows of the VAE token tensors that hold the MSE positions.
            row_of_position = torch.full((packed.length,), -1, dtype=torch.long, device=hidden.device)
            row_of_position[packed.vae_indexes] = torch.arange(packed.vae_indexes.numel(), device=hidden.device)
            rows = row_of_position[packed.mse_indexes]
            if bool((rows < 0).any()):
                raise ValueError("mse_indexes point at positions that are not VAE tokens")
            target = out.eps[rows] - out.x0[rows]
            mse_sum = (prediction.float() - target).pow(2).mean(dim=-1).sum()
        else:
            mse_sum = prediction.float().sum() * 0.0
        return LossSums(ce_sum=ce_sum, ce_tokens=packed.ce_indexes.numel(), mse_sum=mse_sum, mse_tokens=mse_count)


def build_model(config: BagelConfig, device: torch.device | str = "cpu", seed: int | None = 0) -> Bagel:
    """Build and initialise a Bagel on `device` ("meta" skips initialisation)."""
    with torch.device("meta"):
        model = Bagel(config)
    if torch.device(device).type == "meta":
        return model
    model.to_empty(device=device)
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model.init_weights()
    else:
        model.init_weights()
    return model


"""SigLIP NaViT vision encoder over variable-resolution images packed into one sequence.

Keys follow the released checkpoint (`vit_model.vision_model.embeddings.patch_embedding`, ...).
The patch embedding is a Linear over patches flattened in (row, col, channel)
order, and the learned position table is indexed by r * side + c. The encoder
builds num_hidden_layers + 1 + select_layer layers, because BAGEL drops the
last one, and post_layernorm is applied to the output of the last layer built.
"""

import torch
import torch.nn.functional as F
from torch import nn

from bagel.model.configs import ViTConfig


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.patch_embedding = nn.Linear(config.patch_dim, config.hidden_size)
        side = config.image_size // config.patch_size
        self.position_embedding = nn.Embedding(side * side, config.hidden_size)

    def forward(self, patches: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Embed patches [N, patch_dim] at flattened grid ids [N]; return [N, hidden]."""
        weight = self.patch_embedding.weight
        return self.patch_embedding(patches.to(weight.dtype)) + self.position_embedding(position_ids)


class SiglipAttention(nn.Module):
    """Bidirectional multi-head attention restricted to each image."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
        rows = x.shape[0]
        q = self.q_proj(x).view(rows, -1, self.head_dim).transpose(0, 1)  # [H, N, D]
        k = self.k_proj(x).view(rows, -1, self.head_dim).transpose(0, 1)
        v = self.v_proj(x).view(rows, -1, self.head_dim).transpose(0, 1)
        # One SDPA call per image: images never attend to each other.
        outputs = [
            F.scaled_dot_product_attention(qi, ki, vi)
            for qi, ki, vi in zip(q.split(seqlens, 1), k.split(seqlens, 1), v.split(seqlens, 1))
        ]
        out = torch.cat(outputs, dim=1).transpose(0, 1).reshape(rows, -1)
        return self.out_proj(out)


class SiglipMLP(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.self_attn = SiglipAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SiglipMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), seqlens)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(config) for _ in range(config.num_layers_used))

    def forward(self, x: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, seqlens)
        return x


class SiglipVisionTransformer(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.embeddings = SiglipVisionEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, patches: torch.Tensor, position_ids: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
        x = self.embeddings(patches, position_ids)
        return self.post_layernorm(self.encoder(x, seqlens))


class SiglipVisionModel(nn.Module):
    """`vit_model`: encode packed patches [N, patch_dim] of images with `seqlens` patches each into [N, hidden]."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.vision_model = SiglipVisionTransformer(config)

    def forward(self, patches: torch.Tensor, position_ids: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
        return self.vision_model(patches, position_ids, seqlens)

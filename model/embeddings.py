"""BAGEL's small added modules: the ViT connector, the timestep embedder and the fixed 2D sin-cos tables."""

import math

import torch
import torch.nn.functional as F
from torch import nn


class MLPconnector(nn.Module):
    """`connector`: fc1 (vit hidden -> llm hidden), GELU-tanh, fc2 (llm hidden -> llm hidden), both with bias."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Return sinusoidal features [N, dim] of continuous t [N] in [0, 1], laid out as [cos | sin] (DiT style, no x1000)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]
    features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        features = torch.cat([features, torch.zeros_like(features[:, :1])], dim=-1)
    return features


class TimestepEmbedder(nn.Module):
    """`time_embedder`: mlp.0 Linear(256 -> D), SiLU, mlp.2 Linear(D -> D) over timestep_features(t)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = timestep_features(t, self.frequency_embedding_size)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


def sincos_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Return [sin | cos] features [N, embed_dim] of positions [N], omega_i = 1 / 10000^(i / (embed_dim/2))."""
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = positions.double()[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(embed_dim: int, grid_size: int) -> torch.Tensor:
    """Return the fixed table [grid_size**2, embed_dim] in the MAE layout: row r*G+c is [features(c) | features(r)]."""
    rows = torch.arange(grid_size).repeat_interleave(grid_size)
    cols = torch.arange(grid_size).repeat(grid_size)
    table = torch.cat([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], dim=1)
    return table.float()


class PositionEmbedding(nn.Module):
    """`vit_pos_embed` / `latent_pos_embed`: a frozen sin-cos table, stored as a parameter like the release."""

    def __init__(self, max_num_patch_per_side: int, hidden_size: int) -> None:
        super().__init__()
        self.max_num_patch_per_side = max_num_patch_per_side
        self.hidden_size = hidden_size
        self.pos_embed = nn.Parameter(torch.zeros(max_num_patch_per_side**2, hidden_size), requires_grad=False)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Regenerate the table (it is a pure function of its shape), also when the parameter is a sharded DTensor."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        table = sincos_2d(self.hidden_size, self.max_num_patch_per_side)
        table = table.to(device=self.pos_embed.device, dtype=self.pos_embed.dtype)
        if isinstance(self.pos_embed, DTensor):
            table = distribute_tensor(table, self.pos_embed.device_mesh, self.pos_embed.placements)
        self.pos_embed.copy_(table)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.pos_embed[position_ids]
